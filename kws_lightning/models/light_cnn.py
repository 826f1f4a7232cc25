"""The second seed's light Keras CNN on 8 kHz log-spectrograms, with Keras' defaults kept."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input, conv_stack_output_shape


@register_model("light_cnn")
class LightCNN(nn.Module):
    """BatchNorm on the input, three conv blocks, two dense layers: the Kaggle seed's Keras network.

    With the defaults on a (1, 99, 81) input (8 kHz, 20 ms window, 10 ms hop, 81 bins) and 12 classes:

    ==========================  ===============  ==========  =================
    layer                       output (C,T,F)   parameters  multiply-adds
    ==========================  ===============  ==========  =================
    BatchNorm2d(1)              (1, 99, 81)               2                  0
    conv 8 @ 2x2, ReLU          (8, 98, 80)              40            250,880
    conv 8 @ 2x2, ReLU          (8, 97, 79)             264          1,961,728
    max-pool 2x2, dropout 0.2   (8, 48, 39)               0                  0
    conv 16 @ 3x3, ReLU         (16, 46, 37)          1,168          1,960,704
    conv 16 @ 3x3, ReLU         (16, 44, 35)          2,320          3,548,160
    max-pool 2x2, dropout 0.2   (16, 22, 17)              0                  0
    conv 32 @ 3x3, ReLU         (32, 20, 15)          4,640          1,382,400
    max-pool 2x2, dropout 0.2   (32, 10, 7)               0                  0
    flatten                     (2240,)                   0                  0
    dense 128, ReLU, BatchNorm  (128,)              287,104            286,720
    dense 128, ReLU, BatchNorm  (128,)               16,768             16,384
    dense 12 (logits)           (12,)                 1,548              1,536
    total                                           313,854          9,408,512
    ==========================  ===============  ==========  =================

    313,854 trainable parameters; Keras' `model.summary()` reports 314,368 because it also counts the
    BatchNorm moving mean/variance (2 + 256 + 256 = 514 non-trainable), which PyTorch keeps as buffers.

    Keras defaults kept: 'valid' convolutions and floor pooling, BatchNorm momentum 0.99 (PyTorch
    momentum 0.01) and epsilon 1e-3, Glorot-uniform weights with zero biases (`keras_init`). As in the
    seed's source, each dense layer is Dense(relu) followed by BatchNormalization (ReLU before the norm).
    The seed's final softmax is left to the loss. Flatten runs over (C, T, F) here, (T, F, C) in Keras:
    only matters when importing Keras weights.
    """

    default_input_shape = (1, 99, 81)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (8, 16, 32),
        kernels: Sequence[Sequence[int]] = ((2, 2), (3, 3), (3, 3)),
        convs_per_block: Sequence[int] = (2, 2, 1),
        pool: Sequence[int] = (2, 2),
        dropout: float = 0.2,
        dense_units: Sequence[int] = (128, 128),
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-3,
        keras_init: bool = True,
    ) -> None:
        super().__init__()
        if not len(channels) == len(kernels) == len(convs_per_block):
            raise ValueError(
                f"light_cnn: channels {list(channels)}, kernels {list(kernels)} and convs_per_block "
                f"{list(convs_per_block)} need one entry per conv block (same length)"
            )
        self.input_shape = tuple(int(v) for v in input_shape)
        layers: list[nn.Module] = [nn.BatchNorm2d(self.input_shape[0], eps=bn_eps, momentum=bn_momentum)]
        in_channels = self.input_shape[0]
        for out_channels, kernel, n_convs in zip(channels, kernels, convs_per_block, strict=True):
            for _ in range(n_convs):
                layers += [nn.Conv2d(in_channels, out_channels, tuple(kernel)), nn.ReLU()]
                in_channels = out_channels
            layers += [nn.MaxPool2d(tuple(pool)), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        c, t, f = conv_stack_output_shape("light_cnn", self.features, self.input_shape)

        dense: list[nn.Module] = []
        width = c * t * f
        for units in dense_units:
            dense += [
                nn.Linear(width, units),
                nn.ReLU(),
                nn.BatchNorm1d(units, eps=bn_eps, momentum=bn_momentum),
            ]
            width = units
        dense.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*dense)
        if keras_init:
            self.apply(_glorot_uniform_zero_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) log-spectrogram -> (B, num_classes) logits."""
        check_forward_input("light_cnn", x, self.input_shape)
        return self.classifier(self.features(x).flatten(1))


def _glorot_uniform_zero_bias(module: nn.Module) -> None:
    # Keras' Conv2D/Dense initialisers; PyTorch's default (Kaiming-uniform, a=sqrt(5)) trains differently.
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
