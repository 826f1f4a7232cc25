"""Small classifiers over a sequence of speech embeddings (feature=speech_embedding: (B, 1, T, 96)).

The embedding (kws_lightning/speech_embedding.py) already did the acoustic work, so the heads are small:
`embedding_linear` (logistic regression on the flattened T x 96 sequence, the issue's first check),
`embedding_mlp` (one hidden layer) and `embedding_tcn` (temporal convolutions over the sequence, the 96
dimensions as channels, pooled over time, so it does not tie each word to fixed positions). Each takes any
(C, T, F) input, so they also run behind the other front ends (tests/test_feature_matrix.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input


class _FlatHead(nn.Module):
    """Flatten (C, T, F), then `body`; subclasses build `body` and name themselves for errors."""

    name = ""
    default_input_shape = (1, 9, 96)  # 1 s through the speech embedding's default framing

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.width = self.input_shape[0] * self.input_shape[1] * self.input_shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) embeddings -> (B, num_classes) logits."""
        check_forward_input(self.name, x, self.input_shape)
        return self.body(x.flatten(1))


@register_model("embedding_linear")
class EmbeddingLinear(_FlatHead):
    """Dropout, then one linear layer on the flattened sequence (9 x 96 = 864 inputs for 1 s)."""

    name = "embedding_linear"

    def __init__(self, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(input_shape)
        self.body = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.width, num_classes))


@register_model("embedding_mlp")
class EmbeddingMLP(_FlatHead):
    """Linear to `hidden` units, ReLU, dropout, linear to the classes (864 x 256 + 256 x 12: 225k weights)."""

    name = "embedding_mlp"

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: int = 256, dropout: float = 0.3
    ) -> None:
        super().__init__(input_shape)
        self.body = nn.Sequential(
            nn.Linear(self.width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )


@register_model("embedding_tcn")
class EmbeddingTCN(nn.Module):
    """1-D convolutions along time with the embedding dimensions (times input channels) as channels.

    Per entry of `channels`: conv `kernel_size` ('same' padding, no bias) + BatchNorm + ReLU; then the
    maximum and the mean over time, concatenated; dropout; linear. 96 -> 128 -> 128, kernel 3: 86k weights.
    """

    default_input_shape = (1, 9, 96)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (128, 128),
        kernel_size: int = 3,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"embedding_tcn: kernel_size must be odd and >= 1, got {kernel_size}")
        self.input_shape = tuple(int(v) for v in input_shape)
        c, _, f = self.input_shape
        layers: list[nn.Module] = []
        width = c * f
        for out in channels:
            layers += [
                nn.Conv1d(width, out, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(out),
                nn.ReLU(),
            ]
            width = out
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) embeddings -> (B, num_classes) logits."""
        check_forward_input("embedding_tcn", x, self.input_shape)
        seq = x.permute(0, 1, 3, 2).flatten(1, 2)  # (B, C * F, T)
        h = self.convs(seq)
        return self.classifier(torch.cat([h.amax(dim=-1), h.mean(dim=-1)], dim=1))
