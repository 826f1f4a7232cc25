"""res8, res8_narrow, res15: deep residual KWS networks (Tang & Lin, ICASSP 2018) in honk's configuration.

Source: R. Tang, J. Lin, "Deep Residual Learning for Small-Footprint Keyword Spotting", ICASSP 2018
(arXiv:1710.10361); reference implementation `SpeechResModel` in castorini/honk (utils/model.py), configs
RES15 / RES8 / RES8_NARROW there. One class, three registered configurations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kws_lightning.models.registry import register_model
from kws_lightning.models.shapes import check_forward_input, conv_stack_output_shape


class HonkResNet(nn.Module):
    """3x3 conv stack with an identity shortcut every two layers, global average pool, linear.

    As in honk's `SpeechResModel` (layer i = 1..n_layers):

        x = relu(conv0(x)); x = avg_pool(x)        # 4x3 pool in res8 and res8_narrow only; no norm
        old = x
        for i: y = relu(conv_i(x))
               x = y + old if i is even else y     # the shortcut spans two convs
               old = x if i is even                # shortcut source is taken before the norm
               x = bn_i(x)                         # BatchNorm without affine parameters
        logits = linear(mean over (time, frequency) of x)

    All convolutions are 3x3 without bias, 'same' padding; with `use_dilation` conv_i has dilation
    2^((i-1)//3) (1,1,1,2,2,2,4,4,4,8,8,8,16 for res15), otherwise 1. Since every layer preserves the
    (time, frequency) size and the head is a global average, the only input constraint is the pool window.
    BatchNorm has `affine=False` (honk), so the norms add no parameters: with 12 classes the counts are
    n_maps*9 + n_layers*n_maps^2*9 + (n_maps+1)*12.
    """

    default_input_shape = (1, 101, 40)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_feature_maps: int,
        n_layers: int,
        pool: Sequence[int],
        use_dilation: bool,
        model_name: str,
    ) -> None:
        super().__init__()
        if n_feature_maps < 1 or n_layers < 1:
            raise ValueError(
                f"{model_name}: n_feature_maps ({n_feature_maps}) and n_layers ({n_layers}) must be >= 1"
            )
        self.model_name = model_name
        self.input_shape = tuple(int(v) for v in input_shape)
        pool = tuple(int(v) for v in pool)
        self.conv0 = nn.Conv2d(self.input_shape[0], n_feature_maps, 3, padding=1, bias=False)
        self.pool = nn.Identity() if pool == (1, 1) else nn.AvgPool2d(pool)
        conv_stack_output_shape(model_name, [self.conv0, self.pool], self.input_shape)  # raises if too small
        dilations = [2 ** (i // 3) if use_dilation else 1 for i in range(n_layers)]
        self.convs = nn.ModuleList(
            nn.Conv2d(n_feature_maps, n_feature_maps, 3, padding=d, dilation=d, bias=False) for d in dilations
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(n_feature_maps, affine=False) for _ in dilations)
        self.output = nn.Linear(n_feature_maps, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) features -> (B, num_classes) logits."""
        check_forward_input(self.model_name, x, self.input_shape)
        x = self.pool(F.relu(self.conv0(x)))
        shortcut = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True), start=1):
            y = F.relu(conv(x))
            if i % 2 == 0:
                x = y + shortcut
                shortcut = x
            else:
                x = y
            x = norm(x)
        return self.output(x.mean(dim=(2, 3)))


@register_model("res15")
class Res15(HonkResNet):
    """res15: 45 maps, 13 dilated layers, no pooling (honk's RES15).

    On (1, 101, 40) MFCCs with 12 classes: 237,882 parameters (paper: 238K) and 958,813,740 multiply-adds
    (conv0 1.6 M, 13 x 73.6 M, linear 540). The paper's table says 894M multiplies; the architecture and
    parameter count match, but that figure is not reproduced by any per-layer count we tried (101 or 98
    frames, with or without the zero-padded taps), so treat it as the paper's own accounting.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_feature_maps: int = 45,
        n_layers: int = 13,
        pool: Sequence[int] = (1, 1),
        use_dilation: bool = True,
    ) -> None:
        super().__init__(input_shape, num_classes, n_feature_maps, n_layers, pool, use_dilation, "res15")


@register_model("res8")
class Res8(HonkResNet):
    """res8: 45 maps, 4x3 (time x frequency) average pool after conv0, 6 undilated layers (honk's RES8).

    On (1, 101, 40) MFCCs with 12 classes: 110,307 parameters (paper: 110K) and 37,175,490 multiply-adds
    (conv0 1.6 M on 101x40, 6 x 5.9 M on the pooled 25x13, linear 540); the paper's 30M is not reproduced
    (see `Res15`).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_feature_maps: int = 45,
        n_layers: int = 6,
        pool: Sequence[int] = (4, 3),
        use_dilation: bool = False,
    ) -> None:
        super().__init__(input_shape, num_classes, n_feature_maps, n_layers, pool, use_dilation, "res8")


@register_model("res8_narrow")
class Res8Narrow(HonkResNet):
    """res8-narrow: res8 with 19 maps (honk's RES8_NARROW).

    On (1, 101, 40) MFCCs with 12 classes: 19,905 parameters (paper: 19.9K) and 7,026,618 multiply-adds
    (paper: 5.65M, not reproduced; see `Res15`).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_feature_maps: int = 19,
        n_layers: int = 6,
        pool: Sequence[int] = (4, 3),
        use_dilation: bool = False,
    ) -> None:
        super().__init__(
            input_shape, num_classes, n_feature_maps, n_layers, pool, use_dilation, "res8_narrow"
        )
