"""The HTTP / WebSocket service of `python -m kws_lightning.serve` and its page (static/)."""
