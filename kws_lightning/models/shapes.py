"""Shape arithmetic for conv/pool stacks.

Networks derive their flatten size from `input_shape` here instead of hard-coding it, so one config works
for MFCC, log-mel or a shorter clip, and an input smaller than the receptive field fails at build time
with the minimum it needs rather than deep inside a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# Modules whose output has the same (C, T, F) shape as their input; anything else that is not a
# Conv2d/pool must be taught to this file before a network may use it in a shape-derived stack.
_SHAPE_PRESERVING_MODULES = (
    "torch.nn.modules.activation",
    "torch.nn.modules.dropout",
    "torch.nn.modules.batchnorm",
)

Window = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (effective kernel, stride, padding)


def normalize_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return `input_shape` as a ``(channels, time, frequency)`` tuple of positive ints, or raise."""
    try:
        if isinstance(input_shape, str | bytes):  # "123" would otherwise pass as (1, 2, 3)
            raise TypeError
        shape = tuple(int(v) for v in input_shape)
        integral = all(float(v) == int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape, integral = (), False
    if len(shape) != 3 or not integral or min(shape) < 1:
        raise ValueError(
            f"input_shape must be (channels, time, frequency) of positive ints, got {input_shape!r}; "
            "pass features.output_shape(frontend), e.g. (1, 101, 40)"
        )
    return shape


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def _windows(layers: Iterable[nn.Module]) -> list[Window]:
    windows: list[Window] = []
    for layer in layers:
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            if getattr(layer, "ceil_mode", False):
                raise NotImplementedError(f"{layer} uses ceil_mode=True, which shapes.py does not model")
            kernel = _pair(layer.kernel_size)
            dilation = _pair(getattr(layer, "dilation", 1))
            effective = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
            stride = _pair(layer.stride)
            padding = layer.padding
            if padding == "valid":
                padding = 0
            elif padding == "same":  # PyTorch allows 'same' only with stride 1: output = input
                padding, effective = (0, 0), (1, 1)
            windows.append((effective, stride, _pair(padding)))
        elif not (isinstance(layer, nn.Identity) or type(layer).__module__ in _SHAPE_PRESERVING_MODULES):
            raise TypeError(
                f"shapes.py cannot tell how {type(layer).__name__} changes the (C, T, F) shape; "
                "handle it in kws_lightning/models/shapes.py"
            )
    return windows


def output_hw(layers: Iterable[nn.Module], hw: tuple[int, int]) -> tuple[int, int]:
    """(time, frequency) after `layers`; a value below 1 means the input was too small."""
    height, width = hw
    for (kh, kw), (sh, sw), (ph, pw) in _windows(layers):
        height = (height + 2 * ph - kh) // sh + 1
        width = (width + 2 * pw - kw) // sw + 1
    return height, width


def min_input_hw(layers: Iterable[nn.Module]) -> tuple[int, int]:
    """Smallest (time, frequency) for which every layer of `layers` gets at least one output step."""
    height, width = 1, 1
    for (kh, kw), (sh, sw), (ph, pw) in reversed(_windows(layers)):
        # Invert floor((n + 2p - k) / s) + 1 >= m.
        height = max((height - 1) * sh + kh - 2 * ph, 1)
        width = max((width - 1) * sw + kw - 2 * pw, 1)
    return height, width


def conv_stack_output_shape(
    model_name: str, layers: Sequence[nn.Module], input_shape: Sequence[int]
) -> tuple[int, int, int]:
    """(channels, time, frequency) that `layers` produce from one `input_shape` clip.

    Raises ValueError naming the input shape and the minimum when the input is smaller than the stack's
    receptive field.
    """
    channels, height, width = normalize_input_shape(input_shape)
    out_h, out_w = output_hw(layers, (height, width))
    if out_h < 1 or out_w < 1:
        min_h, min_w = min_input_hw(layers)
        raise ValueError(
            f"{model_name}: input_shape {(channels, height, width)} is smaller than the network's receptive "
            f"field; it needs at least {(channels, min_h, min_w)} (channels, time, frequency). Use a longer "
            "clip or more frequency bins, or smaller kernels/pools in conf/model"
        )
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
    return channels, out_h, out_w


def check_forward_input(model_name: str, x: torch.Tensor, input_shape: tuple[int, int, int]) -> None:
    """Raise a clear ValueError when `x` is not (B, *input_shape), instead of a Linear size mismatch."""
    if torch.jit.is_tracing():  # shapes are fixed by the example input; the check only adds TracerWarnings
        return
    if x.dim() != 4 or tuple(x.shape[1:]) != input_shape:
        raise ValueError(
            f"{model_name} was built for inputs (B, {', '.join(map(str, input_shape))}), "
            f"got {tuple(x.shape)}: build it with input_shape=features.output_shape(frontend)"
        )
