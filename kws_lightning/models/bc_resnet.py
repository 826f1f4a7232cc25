"""BC-ResNet (Kim et al., Interspeech 2021): broadcasted residual learning with sub-spectral normalisation.

Source: B. Kim, S. Chang, J. Lee, D. Sung, "Broadcasted Residual Learning for Efficient Keyword Spotting",
Interspeech 2021 (arXiv:2106.04140); reference implementation Qualcomm-AI-research/bcresnet (bcresnet.py
`BCResNets`, subspectralnorm.py `SubSpectralNorm`; main.py builds `BCResNets(int(tau * 8))`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input

_STAGE_BLOCKS = (2, 2, 4, 4)  # BC-ResBlocks per stage
_STRIDED_STAGES = (1, 2)  # stages whose first block halves the frequency axis


class SubSpectralNorm(nn.Module):
    """BatchNorm with separate statistics and affine parameters for each of `sub_bands` frequency bands.

    Works on (B, C, F, T): F must be divisible by `sub_bands`. Parameters: 2 x C x sub_bands.
    """

    def __init__(self, channels: int, sub_bands: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.sub_bands = sub_bands
        self.norm = nn.BatchNorm2d(channels * sub_bands, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, t = x.shape
        return self.norm(x.reshape(b, c * self.sub_bands, f // self.sub_bands, t)).reshape(b, c, f, t)


class BCResBlock(nn.Module):
    """One BC-ResBlock on (B, C, F, T).

    f2 (2-D, frequency): [1x1 conv + BN + ReLU when the width changes (transition block)], depthwise 3x1
    conv (frequency stride `freq_stride`) + SubSpectralNorm. f1 (1-D, time): average over frequency,
    depthwise 1x3 conv dilated 2^stage in time + BN + SiLU, 1x1 conv, channel dropout. Output:
    ReLU(f1 broadcast over frequency + f2 [+ input, if not a transition block]).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stage: int,
        freq_stride: int,
        sub_bands: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.transition = in_channels != out_channels
        f2: list[nn.Module] = []
        if self.transition:
            f2 += [
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
        f2 += [
            nn.Conv2d(
                out_channels, out_channels, (3, 1), (freq_stride, 1), (1, 0), groups=out_channels, bias=False
            ),
            SubSpectralNorm(out_channels, sub_bands),
        ]
        self.f2 = nn.Sequential(*f2)
        dilation = 2**stage
        self.f1 = nn.Sequential(
            nn.Conv2d(
                out_channels,
                out_channels,
                (1, 3),
                padding=(0, dilation),
                dilation=(1, dilation),
                groups=out_channels,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 1, bias=False),
            nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = self.f2(x)
        out = self.f1(aux.mean(dim=2, keepdim=True)) + aux  # broadcast the temporal path over frequency
        if not self.transition:
            out = out + x
        return torch.relu(out)


@register_model("bc_resnet")
class BCResNet(nn.Module):
    """BC-ResNet-`scale`: base width b = int(8 * scale), stage widths 2b | b, 1.5b, 2b, 2.5b | 4b.

    =========================  ===================  ======================================
    part                       channels             (frequency, time) on 40 x 101 log-mels
    =========================  ===================  ======================================
    conv 5x5 stride (2, 1)     2b                   20 x 101
    stage 1: 2 BC-ResBlocks    b                    20 x 101  (time dilation 1)
    stage 2: 2 blocks          int(1.5 b)           10 x 101  (first block freq stride 2, dil. 2)
    stage 3: 4 blocks          2b                   5 x 101   (first block freq stride 2, dil. 4)
    stage 4: 4 blocks          int(2.5 b)           5 x 101   (dilation 8)
    dw conv 5x5, no freq pad   int(2.5 b)           1 x 101
    1x1 conv + BN + ReLU       4b                   1 x 101
    average, 1x1 conv          classes
    =========================  ===================  ======================================

    With 12 classes on (1, 101, 40) log-mels (the paper's input: 40 log-mels x 101 frames):

    =====  ====  ==========  ===========  =============
    scale  b     parameters  paper        multiply-adds
    =====  ====  ==========  ===========  =============
    1      8          9,232  9.2K             2,482,156
    1.5    12        17,154  18.1K (*)        4,607,994
    2      16        27,284  27.3K            7,323,672
    3      24        54,168  54.2K           14,524,548
    6      48       187,812  188K            50,283,336
    8      64       321,068  321K            85,919,328
    =====  ====  ==========  ===========  =============

    (*) The reference's width rule gives 17,154 at scale 1.5 (its `int(tau * 8)` = 12). For even b the
    count is exactly 69 b^2 + 600.5 b + 12, which reproduces the five other sizes; 18.1K would need b of
    about 12.4, so the paper's 1.5 figure is not reproducible from the published code.

    The network works on (B, C, frequency, time) internally, as the reference does; our (B, C, T, F)
    input is transposed on entry. The frequency axis must survive three halvings into bands divisible by
    `sub_bands` and be at least 5 bins wide at the classifier's 5x5 depthwise conv: 40 bins is the design
    point.
    """

    default_input_shape = (1, 101, 40)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        scale: float = 1.0,
        sub_bands: int = 5,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        base = int(8 * scale)
        if base < 1:
            raise ValueError(
                f"bc_resnet: scale {scale} gives base width int(8 * scale) = {base}; use scale >= 0.125"
            )
        self.input_shape = tuple(int(v) for v in input_shape)
        in_channels, _, freq = self.input_shape
        widths = [base * 2, base, int(base * 1.5), base * 2, int(base * 2.5), base * 4]

        # Frequency bins seen by each stage: the head and each strided stage halve them (rounding up).
        stage_freqs = []
        f = math.ceil(freq / 2)
        for stage in range(len(_STAGE_BLOCKS)):
            f = math.ceil(f / 2) if stage in _STRIDED_STAGES else f
            stage_freqs.append(f)
        if any(f % sub_bands for f in stage_freqs) or stage_freqs[-1] < 5:
            raise ValueError(
                f"bc_resnet: {freq} frequency bins give {stage_freqs} bins in the four stages; "
                f"SubSpectralNorm needs each divisible by sub_bands={sub_bands} and the classifier's 5x5 "
                "conv needs >= 5 at the end. Use 40 (or 80, 120, ...) mel bins"
            )

        self.head = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 5, (2, 1), 2, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        for stage, n_blocks in enumerate(_STAGE_BLOCKS):
            for index in range(n_blocks):
                stride = 2 if stage in _STRIDED_STAGES and index == 0 else 1
                c_in = widths[stage] if index == 0 else widths[stage + 1]
                blocks.append(BCResBlock(c_in, widths[stage + 1], stage, stride, sub_bands, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Conv2d(widths[-2], widths[-2], 5, padding=(0, 2), groups=widths[-2], bias=False),
            nn.Conv2d(widths[-2], widths[-1], 1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(widths[-1], num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) log-mels -> (B, num_classes) logits."""
        check_forward_input("bc_resnet", x, self.input_shape)
        x = self.blocks(self.head(x.transpose(2, 3)))  # (B, C, F, T) as in the reference
        return self.classifier(x).flatten(1)
