"""TC-ResNet8 and TC-ResNet14 (Choi et al., Interspeech 2019): 1-D temporal convolutions over MFCC channels.

Source: S. Choi, S. Seo, B. Shin, H. Byun, M. Kersner, B. Kim, D. Kim, S. Ha, "Temporal Convolution for
Real-time Keyword Spotting on Mobile Devices", Interspeech 2019 (arXiv:1904.03814); reference
implementation `tc_resnet` / `TCResNet8` / `TCResNet14` / `TCResNet_arg_scope` in hyperconnect/TC-ResNet
(audio_nets/tc_resnet.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input


class _ResidualBlock(nn.Module):
    """conv k (stride s) + BN + ReLU, conv k + BN, + shortcut, ReLU.

    The shortcut is the identity when the width is unchanged, else a strided 1x1 conv + BN + ReLU (the
    reference's `down` conv inherits the arg scope's ReLU).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bn_momentum: float, bn_eps: float):
        super().__init__()
        stride = 1 if in_channels == out_channels else 2  # the reference strides exactly when width changes
        pad = (kernel - 1) // 2
        self.body = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel, stride, pad, bias=False),
            nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(),
            nn.Conv1d(out_channels, out_channels, kernel, 1, pad, bias=False),
            nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=bn_momentum),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=bn_momentum),
                nn.ReLU(),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TCResNet(nn.Module):
    """Frequency bins (times input channels) become the channels of 1-D convolutions along time.

    conv `first_kernel` (no bias) + BN + ReLU to channels[0]; one residual block per further entry of
    `channels` (stride 2 where the width changes); global average over time; dropout; linear without bias
    (the reference's `fc` 1x1 conv has no bias; its extra 2-unit `fc2` "ranges" head is not a classifier
    and is left out). Widths are int(channel * width_multiplier) as in the reference.

    The paper's parameter counts are TensorFlow variable counts, which include BatchNorm's moving mean and
    variance: our trainable parameters + the running_mean/running_var elements give TC-ResNet8 65,824 (paper
    66K), TC-ResNet8-1.5 145,248 (145K), TC-ResNet14 136,928 (137K), TC-ResNet14-1.5 304,608 (305K), with
    12 classes on 40 MFCCs. Its FLOPs are 2 x multiply-adds on the reference's 98 frames (30 ms window,
    10 ms hop, no centre padding): 3.05 M (paper 3.0M), 6.57 M (6.6M), 6.06 M (6.1M), 13.35 M (13.4M).

    'Same' padding is symmetric ((kernel - 1) // 2) rather than TF's: the output lengths are identical
    (ceil(T / 2) per stride), only where the even-length strided windows sit differs by one frame.
    """

    default_input_shape = (1, 101, 40)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        width_multiplier: float,
        kernel_size: int,
        first_kernel_size: int,
        dropout: float,
        bn_momentum: float,
        bn_eps: float,
        model_name: str,
    ) -> None:
        super().__init__()
        widths = [int(c * width_multiplier) for c in channels]
        if len(widths) < 1 or min(widths) < 1:
            raise ValueError(
                f"{model_name}: channels {list(channels)} x width_multiplier {width_multiplier} gives widths "
                f"{widths}; every width must be >= 1"
            )
        for name, k in (("kernel_size", kernel_size), ("first_kernel_size", first_kernel_size)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{model_name}: {name} must be odd and >= 1 for 'same' padding, got {k}")
        self.model_name = model_name
        self.input_shape = tuple(int(v) for v in input_shape)
        in_channels = self.input_shape[0] * self.input_shape[2]  # (C, T, F): C x F channels along T
        self.stem = nn.Sequential(
            nn.Conv1d(
                in_channels, widths[0], first_kernel_size, padding=(first_kernel_size - 1) // 2, bias=False
            ),
            nn.BatchNorm1d(widths[0], eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            *(
                _ResidualBlock(c_in, c_out, kernel_size, bn_momentum, bn_eps)
                for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
            )
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) features -> (B, num_classes) logits."""
        check_forward_input(self.model_name, x, self.input_shape)
        x = x.permute(0, 1, 3, 2).flatten(1, 2)  # (B, C * F, T)
        x = self.blocks(self.stem(x)).mean(dim=2)
        return self.classifier(self.dropout(x))


@register_model("tc_resnet8")
class TCResNet8(TCResNet):
    """TC-ResNet8: stem 16, blocks 24 / 32 / 48 (each stride 2). `width_multiplier=1.5` is TC-ResNet8-1.5.

    On (1, 101, 40) with 12 classes: 65,168 trainable parameters (+656 BatchNorm statistics = 65,824, the
    paper's 66K) and 1,563,264 multiply-adds (1,522,560 on the paper's 98 frames).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 24, 32, 48),
        width_multiplier: float = 1.0,
        kernel_size: int = 9,
        first_kernel_size: int = 3,
        dropout: float = 0.5,  # reference keep_prob 0.5
        bn_momentum: float = 0.003,  # reference batch_norm decay 0.997
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__(
            input_shape,
            num_classes,
            channels,
            width_multiplier,
            kernel_size,
            first_kernel_size,
            dropout,
            bn_momentum,
            bn_eps,
            "tc_resnet8",
        )


@register_model("tc_resnet14")
class TCResNet14(TCResNet):
    """TC-ResNet14: stem 16, blocks 24, 24, 32, 32, 48, 48 (stride 2 where the width grows).
    `width_multiplier=1.5` is TC-ResNet14-1.5.

    On (1, 101, 40) with 12 classes: 135,856 trainable parameters (+1,072 BatchNorm statistics = 136,928,
    the paper's 137K) and 3,110,400 multiply-adds (3,030,528 on the paper's 98 frames). With
    width_multiplier 1.5: 303,000 (+1,608 = 304,608, paper 305K).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 24, 24, 32, 32, 48, 48),
        width_multiplier: float = 1.0,
        kernel_size: int = 9,
        first_kernel_size: int = 3,
        dropout: float = 0.5,
        bn_momentum: float = 0.003,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__(
            input_shape,
            num_classes,
            channels,
            width_multiplier,
            kernel_size,
            first_kernel_size,
            dropout,
            bn_momentum,
            bn_eps,
            "tc_resnet14",
        )
