"""`KWSModel`: feature front end + network, raw 16 kHz audio in, logits out.

This is what checkpoints and exports hold, so training, evaluation, streaming and export can never
disagree on features.
"""

from __future__ import annotations

import torch
from torch import nn


class KWSModel(nn.Module):
    """`frontend` maps waves (B, N) to features (B, C, T, F); `net` maps those to logits (B, classes)."""

    def __init__(self, frontend: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.net = net

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        """Float waves (B, N) in [-1, 1] at the front end's sample rate -> logits (B, num_classes)."""
        if waves.dim() != 2:
            raise ValueError(
                f"KWSModel expects float waves of shape (batch, samples), got {tuple(waves.shape)}; "
                "add a batch dimension with waves.unsqueeze(0) for a single clip"
            )
        return self.net(self.frontend(waves))

    def predict_proba(self, waves: torch.Tensor) -> torch.Tensor:
        """Class posteriors (B, num_classes), rows summing to 1. Call under eval() for inference."""
        return torch.softmax(self(waves), dim=-1)
