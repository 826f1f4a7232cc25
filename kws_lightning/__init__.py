"""Keyword spotting on Speech Commands with PyTorch Lightning and Hydra."""
