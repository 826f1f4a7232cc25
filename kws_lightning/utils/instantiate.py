"""Build the run's objects from Hydra config nodes (`_target_`), one helper per kind.

For the configs a user composes (trusted); a checkpoint's stored config is built by
`kws_lightning.checkpoints.build_stored` instead, through a registry, never by `_target_`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_kws_model(
    feature_cfg: Mapping[str, Any] | DictConfig,
    model_cfg: Mapping[str, Any] | DictConfig,
    num_classes: int,
    num_samples: int = 16000,
) -> Any:
    """`KWSModel(frontend, net)` from a feature config and a (partial) model config.

    The network's input shape is measured from the front end on a clip of `num_samples`, so a feature
    change never needs a matching edit in the model config.
    """
    return assemble_kws_model(instantiate(feature_cfg), instantiate(model_cfg), num_classes, num_samples)


def assemble_kws_model(
    frontend: Any, net_factory: Callable[..., Any], num_classes: int, num_samples: int = 16000
) -> Any:
    """`KWSModel(frontend, net)`, the network built by `net_factory` for the front end's measured output
    shape. Shared by training (configs built by Hydra) and checkpoints (kws_lightning.checkpoints, whose
    stored configs are built through a registry, never by Hydra)."""
    from kws_lightning.features import output_shape
    from kws_lightning.models.kws_model import KWSModel

    net = net_factory(
        input_shape=tuple(output_shape(frontend, num_samples=num_samples)), num_classes=num_classes
    )
    return KWSModel(frontend, net)


def instantiate_named(group_cfg: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers), skipping null entries.

    A group is a mapping name -> config so an experiment can drop one entry (`callbacks.foo=null`) or
    add one without repeating the others.
    """
    if not group_cfg:
        return []
    if not isinstance(group_cfg, DictConfig):
        raise TypeError(f"the {kind} config must be a mapping of name -> config, got {group_cfg!r}")
    objects = []
    for name, entry in group_cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{kind}.{name} has no _target_: give it one or set {kind}.{name}=null")
        objects.append(instantiate(entry))
    return objects


def to_plain(cfg: DictConfig | None) -> dict[str, Any]:
    """Resolved plain containers: safe to pickle into a checkpoint and to write as YAML."""
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
