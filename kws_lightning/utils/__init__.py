"""Small helpers for the training entry point: building objects from config, schedules, reporting."""
