"""Parameter and multiply-add counts; `python -m kws_lightning.models.summary` prints every registered model.

MACs count the multiply-adds of Conv1d/Conv2d/Linear for one clip (batch of 1); biases, norms,
activations and pooling are left out, as in the KWS papers' figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kws_lightning.models.registry import MODELS, available_models, build_model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (not buffers such as BatchNorm running statistics)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass on a single input of `input_shape` (no batch dimension).

    Runs the model once on zeros in eval mode (so BatchNorm statistics are untouched) and restores each
    submodule's train/eval mode afterwards.
    """
    macs = 0

    def conv_hook(module: nn.Conv1d | nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        macs += output.numel() * per_output

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        macs += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *(int(v) for v in input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return macs


def main(num_classes: int = 12) -> None:
    """Print name, default input, parameters and MACs of every registered model."""
    print(f"{'model':<20} {'input (C,T,F)':<16} {'params':>12} {'MACs':>14}")
    for name in available_models():
        input_shape = getattr(MODELS[name], "default_input_shape", None)
        if input_shape is None:
            print(f"{name:<20} (no default_input_shape attribute)")
            continue
        model = build_model(name, input_shape, num_classes)
        params, macs = count_parameters(model), count_macs(model, input_shape)
        print(f"{name:<20} {str(tuple(input_shape)):<16} {params:>12,} {macs:>14,}")


if __name__ == "__main__":
    main()
