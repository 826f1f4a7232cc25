"""MatchboxNet BxRxC (Majumdar & Ginsburg, Interspeech 2020): QuartzNet-style 1-D time-channel separable CNN.

Source: S. Majumdar, B. Ginsburg, "MatchboxNet: 1D Time-Channel Separable Convolutional Neural Network
Architecture for Speech Commands Recognition", Interspeech 2020 (arXiv:2004.08531); reference
implementation NVIDIA NeMo: examples/asr/conf/matchboxnet/matchboxnet_3x1x64_v1.yaml (encoder
`ConvASREncoder` of `JasperBlock`s, nemo/collections/asr/parts/submodules/jasper.py; decoder
`ConvASRDecoderClassification`, average pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input


def _conv_bn(
    in_channels: int, out_channels: int, kernel: int, dilation: int = 1, separable: bool = True
) -> list[nn.Module]:
    """NeMo's `_get_conv_bn_layer`: [depthwise k, pointwise 1x1] or one full conv, then BN; no biases."""
    pad = dilation * (kernel - 1) // 2
    if separable:
        convs = [
            nn.Conv1d(
                in_channels,
                in_channels,
                kernel,
                padding=pad,
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            nn.Conv1d(in_channels, out_channels, 1, bias=False),
        ]
    else:
        convs = [nn.Conv1d(in_channels, out_channels, kernel, padding=pad, dilation=dilation, bias=False)]
    return [*convs, nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.1)]


class _Block(nn.Module):
    """`repeat` sub-blocks (conv-BN, ReLU, dropout); the residual (pointwise conv + BN of the block input)
    is added after the last sub-block's BN, before its ReLU and dropout, as in NeMo's JasperBlock."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        repeat: int,
        dropout: float,
        dilation: int = 1,
        separable: bool = True,
        residual: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(repeat):
            channels_in = in_channels if index == 0 else out_channels
            layers += _conv_bn(channels_in, out_channels, kernel, dilation, separable)
            if index < repeat - 1:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.residual = (
            nn.Sequential(*_conv_bn(in_channels, out_channels, 1, separable=False)) if residual else None
        )
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.residual is not None:
            y = y + self.residual(x)
        return self.out(y)


@register_model("matchboxnet")
class MatchboxNet(nn.Module):
    """Prologue, B residual blocks of R separable sub-blocks with C channels, two epilogue convs, average
    pool over time, linear. B = len(kernels); the default is MatchboxNet-3x2x64.

    =================  ========  ==========================  =======================
    layer              channels  kernel                      notes
    =================  ========  ==========================  =======================
    prologue (C1)      128       11                          separable, no residual
    block b, R times   C = 64    kernels[b] = 13 / 15 / 17   separable, residual
    epilogue (C2)      128       29, dilation 2              separable
    epilogue (C3)      128       1                           full conv
    pool + linear      classes                               (the paper's 1x1 C4 conv)
    =================  ========  ==========================  =======================

    Frequency bins (times input channels) are the channels; every conv has stride 1 and 'same' padding,
    so any number of frames works. Paper counts (64 MFCCs, the 30 classes of Speech Commands v1): 3x1x64
    77K, 3x2x64 93K, 6x2x64 140K (kernels 13, 15, 17, 21, 23, 25); ours with 64 MFCCs and 30 classes:
    77,214, 92,766, 139,614 (v2's 35 classes add 645). On our (1, 101, 40) MFCCs with 12 classes,
    3x2x64 has 87,108 parameters (the prologue's 64 -> 40 input channels save 3,336, the 12-way linear
    2,322) and 8,449,176 multiply-adds; on the full recipes' (1, 101, 64) MFCCs (matchboxnet_v1_full) with
    12 classes, 90,444 parameters and 8,786,112 multiply-adds.

    NeMo's masked convolutions (for padded variable-length batches) are unnecessary for fixed 1 s clips.
    """

    default_input_shape = (1, 101, 40)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        kernels: Sequence[int] = (13, 15, 17),
        repeat: int = 2,
        channels: int = 64,
        prologue_channels: int = 128,
        prologue_kernel: int = 11,
        epilogue_channels: int = 128,
        epilogue_kernel: int = 29,
        epilogue_dilation: int = 2,
        final_channels: int = 128,
        dropout: float = 0.0,  # NeMo's matchboxnet configs
    ) -> None:
        super().__init__()
        kernels = [int(k) for k in kernels]
        all_kernels = [prologue_kernel, *kernels, epilogue_kernel]
        if not kernels or any(k < 1 or k % 2 == 0 for k in all_kernels):
            raise ValueError(
                f"matchboxnet: kernels {kernels}, prologue_kernel {prologue_kernel} and epilogue_kernel "
                f"{epilogue_kernel} must be odd (for 'same' padding), with at least one block kernel"
            )
        if min(repeat, channels, prologue_channels, epilogue_channels, final_channels, epilogue_dilation) < 1:
            raise ValueError("matchboxnet: repeat, channel counts and epilogue_dilation must be >= 1")
        self.input_shape = tuple(int(v) for v in input_shape)
        in_channels = self.input_shape[0] * self.input_shape[2]
        blocks = [_Block(in_channels, prologue_channels, prologue_kernel, 1, dropout)]
        width = prologue_channels
        for kernel in kernels:
            blocks.append(_Block(width, channels, kernel, repeat, dropout, residual=True))
            width = channels
        blocks += [
            _Block(width, epilogue_channels, epilogue_kernel, 1, dropout, dilation=epilogue_dilation),
            _Block(epilogue_channels, final_channels, 1, 1, dropout, separable=False),
        ]
        self.encoder = nn.Sequential(*blocks)
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) features -> (B, num_classes) logits."""
        check_forward_input("matchboxnet", x, self.input_shape)
        x = x.permute(0, 1, 3, 2).flatten(1, 2)  # (B, C * F, T)
        return self.classifier(self.encoder(x).mean(dim=2))
