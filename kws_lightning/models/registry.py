"""Networks by name: `register_model` adds one, `build_model` makes one from a config's hyper-parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kws_lightning.models.shapes import normalize_input_shape

MODELS: dict[str, type[nn.Module]] = {}

# Every network's __init__ takes these two from the data/front end; the rest are its hyper-parameters.
_BUILD_ARGS = ("input_shape", "num_classes")

ModelT = TypeVar("ModelT", bound=type[nn.Module])


def register_model(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator: make the network buildable as `build_model(name, ...)` and `model: <name>`."""

    def decorator(cls: ModelT) -> ModelT:
        existing = MODELS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"model name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; pick another name for "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        params = inspect.signature(cls.__init__).parameters
        missing = [arg for arg in _BUILD_ARGS if arg not in params]
        if missing:
            raise TypeError(
                f"{cls.__qualname__}.__init__ must accept {list(_BUILD_ARGS)}; it lacks {missing}"
            )
        MODELS[name] = cls
        return cls

    return decorator


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters model `name` accepts, with their defaults (`inspect.Parameter.empty` if none)."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return {
        key: param.default
        for key, param in params.items()
        if key != "self"
        and key not in _BUILD_ARGS
        and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **hparams: Any) -> nn.Module:
    """Build registered network `name` for (channels, time, frequency) inputs and `num_classes` outputs.

    Hydra hands lists in as ListConfig; they are converted to plain Python so modules and checkpoints hold
    no OmegaConf objects.
    """
    cls = _lookup(name)
    accepted = hyperparameters(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} ({cls.__qualname__}) got unknown hyper-parameter(s) {unknown}; "
            f"it accepts {sorted(accepted)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    plain = {
        key: OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
        for key, value in hparams.items()
    }
    return cls(input_shape=normalize_input_shape(input_shape), num_classes=num_classes, **plain)


def _lookup(name: str) -> type[nn.Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {available_models()}") from None
