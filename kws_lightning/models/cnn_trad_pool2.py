"""cnn-trad-pool2 (Sainath & Parada, Interspeech 2015) in honk's configuration: the first seed's network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input, conv_stack_output_shape


@register_model("cnn_trad_pool2")
class CNNTradPool2(nn.Module):
    """Two convolutions and one linear layer, on (C, time, frequency) features such as 40 MFCCs.

    With honk's defaults on a (1, 101, 40) input and 12 classes:

    ====================  ===============  ===========
    layer                 output (C,T,F)   parameters
    ====================  ===============  ===========
    conv1 64 @ 20x8       (64, 82, 33)         10,304
    ReLU, max-pool 2x2    (64, 41, 16)              0
    conv2 64 @ 10x4       (64, 32, 13)        163,904
    ReLU, dropout 0.5     (64, 32, 13)              0
    flatten, linear       (12,)               319,500
    total                                     493,708
    ====================  ===============  ===========

    About 96.2 M multiply-adds per clip (27.7 M conv1, 68.2 M conv2, 0.3 M linear).

    The linear layer's width is derived from `input_shape`, so the same hyper-parameters serve log-mel
    or a 0.5 s clip; an input smaller than the receptive field (39 x 15 with the defaults) is a
    ValueError. Dropout follows the seed description (after conv2 only); honk and TensorFlow's
    `create_conv_model` also drop out after conv1 (before the pool): set `conv1_dropout=True` for that.
    """

    default_input_shape = (1, 101, 40)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_feature_maps: int = 64,
        conv1_kernel: Sequence[int] = (20, 8),
        conv1_stride: Sequence[int] = (1, 1),
        pool: Sequence[int] = (2, 2),
        conv2_kernel: Sequence[int] = (10, 4),
        conv2_stride: Sequence[int] = (1, 1),
        dropout: float = 0.5,
        conv1_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape)
        conv1 = nn.Conv2d(self.input_shape[0], n_feature_maps, tuple(conv1_kernel), tuple(conv1_stride))
        if conv1_dropout:
            first_block = [conv1, nn.ReLU(), nn.Dropout(dropout), nn.MaxPool2d(tuple(pool))]
        else:
            # max-pool then ReLU equals ReLU then max-pool (ReLU is monotonic) and applies ReLU to a quarter
            # of the values: 10 % of predict's time. Same module indices, so checkpoints load either way.
            first_block = [conv1, nn.MaxPool2d(tuple(pool)), nn.ReLU(inplace=True), nn.Identity()]
        self.features = nn.Sequential(
            *first_block,
            nn.Conv2d(n_feature_maps, n_feature_maps, tuple(conv2_kernel), tuple(conv2_stride)),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        channels, time, freq = conv_stack_output_shape("cnn_trad_pool2", self.features, self.input_shape)
        self.classifier = nn.Linear(channels * time * freq, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) features -> (B, num_classes) logits."""
        check_forward_input("cnn_trad_pool2", x, self.input_shape)
        return self.classifier(self.features(x).flatten(1))
