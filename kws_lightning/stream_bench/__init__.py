"""The streaming benchmark (`python -m kws_lightning.stream_eval`): long streams with a ground truth, the
detector's decisions over a threshold sweep, miss rate / false alarms per hour, DET plots, tuned settings."""
