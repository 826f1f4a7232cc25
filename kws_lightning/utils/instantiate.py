"""Build the run's objects from Hydra config nodes (`_target_`), one helper per kind."""

from __future__ import annotations

from collections.abc import Mapping
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
    from kws_lightning.features import output_shape
    from kws_lightning.models.kws_model import KWSModel

    frontend = instantiate(feature_cfg)
    net = instantiate(model_cfg)(
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
