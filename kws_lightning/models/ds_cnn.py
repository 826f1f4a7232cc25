"""DS-CNN (Zhang et al. 2017, "Hello Edge") in the S / M / L configurations of ARM's ML-KWS-for-MCU.

Source: Y. Zhang, N. Suda, L. Lai, V. Chandra, "Hello Edge: Keyword Spotting on Microcontrollers",
arXiv:1711.07128; reference implementation `create_ds_cnn_model` in ARM-software/ML-KWS-for-MCU
(models.py), layer sizes from its train_commands.txt (`--model_size_info`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input

# (out channels, kernel (time, freq), stride (time, freq)) per layer; layer 0 is a full conv, the rest
# depthwise-separable. Straight from train_commands.txt.
_SIZES: dict[str, tuple[tuple[int, tuple[int, int], tuple[int, int]], ...]] = {
    "S": ((64, (10, 4), (2, 2)),) + ((64, (3, 3), (1, 1)),) * 4,
    "M": ((172, (10, 4), (2, 1)), (172, (3, 3), (2, 2))) + ((172, (3, 3), (1, 1)),) * 3,
    "L": ((276, (10, 4), (2, 1)), (276, (3, 3), (2, 2))) + ((276, (3, 3), (1, 1)),) * 4,
}


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of TensorFlow's 'SAME': output ceil(size / stride), extra pad after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@register_model("ds_cnn")
class DSCNN(nn.Module):
    """Conv 10x4 + BN + ReLU, then depthwise-separable layers (dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU),
    global average pool, linear.

    ====  ========  ======================  ==================  ==============================
    size  channels  conv1 (kernel, stride)  DS layers (stride)  paper figures (memory, ops)
    ====  ========  ======================  ==================  ==============================
    S     64        10x4, 2x2               4 (all 1x1)         38.6 KB, 5.4 M
    M     172       10x4, 2x1               4 (first 2x2)       189.7 KB as quoted (*), 19.8 M
    L     276       10x4, 2x1               5 (first 2x2)       497.6 KB, 56.9 M
    ====  ========  ======================  ==================  ==============================

    The paper gives no parameter counts: its figures are memory = 8-bit weights (BatchNorm folded into
    the convolutions, so one bias per output channel) + the largest input+output activation pair of one
    layer, on its input of 49 frames x 10 MFCCs (40 ms window, 20 ms hop). On that (1, 49, 10) input
    this module gives S: 22,604 folded weights + 16,000 activations = 38,604 (38.6K); M: 135,032 +
    54,180 = 189,212 (189.2K); L: 410,700 + 86,940 = 497,640 (497.6K). (*) The rule that reproduces S
    and L to the byte-rounding gives 189.2K for M, 0.26% under the 189.7K we were given for the paper;
    189.7K would need the 490-byte input buffer counted for M only. Ops = 2 x multiply-adds: 5.31 M /
    19.63 M / 56.66 M (the paper also counts bias, norm and activation ops, hence slightly more).
    Trainable parameters with 12 classes: S 23,180, M 136,580, L 413,736 on any input (the head is a
    global average, so only the number of classes changes the count).

    On our (1, 101, 40) MFCCs with 12 classes: the same parameters; S 21.7 M, M 78.8 M, L 227.0 M
    multiply-adds (the first conv's output grows from 25x5 to 51x20 / 51x40 frames x bins).

    Padding is TensorFlow's 'SAME' (asymmetric zero padding computed from `input_shape`), so every layer's
    output is ceil(input / stride) as in the reference, for any input size. Differences from the reference,
    none changing the trainable count: convolutions carry no bias and BatchNorm has a scale (TF: conv
    bias, BatchNorm without scale); no dropout (the reference defines none for DS-CNN). `channels`
    overrides the per-layer widths of the chosen size (same number of layers).
    """

    default_input_shape = (1, 101, 40)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        size: str = "S",
        channels: Sequence[int] | None = None,
        bn_momentum: float = 0.04,  # TF batch_norm decay 0.96 in the reference
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if size not in _SIZES:
            raise ValueError(f"ds_cnn: unknown size {size!r}; valid sizes: {sorted(_SIZES)}")
        layers = _SIZES[size]
        widths = [c for c, _, _ in layers] if channels is None else [int(c) for c in channels]
        if len(widths) != len(layers) or min(widths) < 1:
            raise ValueError(
                f"ds_cnn: channels {list(channels or [])} must give {len(layers)} positive widths "
                f"(one per layer of size {size!r}), or be null for the paper's {[c for c, _, _ in layers]}"
            )
        self.input_shape = tuple(int(v) for v in input_shape)
        in_channels, time, freq = self.input_shape

        def norm_relu(c: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum), nn.ReLU()]

        modules: list[nn.Module] = []
        for index, (width, (_, (kt, kf), (st, sf))) in enumerate(zip(widths, layers, strict=True)):
            pad_t, pad_f = tf_same_padding(time, kt, st), tf_same_padding(freq, kf, sf)
            modules.append(nn.ZeroPad2d((*pad_f, *pad_t)))  # (left, right, top, bottom) = freq, then time
            if index == 0:
                modules += [nn.Conv2d(in_channels, width, (kt, kf), (st, sf), bias=False), *norm_relu(width)]
            else:
                modules += [
                    nn.Conv2d(in_channels, in_channels, (kt, kf), (st, sf), groups=in_channels, bias=False),
                    *norm_relu(in_channels),
                    nn.Conv2d(in_channels, width, 1, bias=False),
                    *norm_relu(width),
                ]
            in_channels, time, freq = width, math.ceil(time / st), math.ceil(freq / sf)
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) features -> (B, num_classes) logits."""
        check_forward_input("ds_cnn", x, self.input_shape)
        return self.classifier(self.features(x).mean(dim=(2, 3)))
