"""Open checkpoints as data, never as code: the one loader and the one builder every checkpoint path uses.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers (dict, list,
str, numbers) only, so a pickled ``__reduce__`` payload is refused instead of run. What Lightning and
kws-lightning write today needs no allow-listed class at all (tests/test_checkpoints.py checks a real
training run's checkpoint): keep it that way, store state in plain form.

The model (and, for `eval`, the data module) is rebuilt from the checkpoint's stored config by name from
a small registry per config key (`STORED_TARGETS`), never by importing an arbitrary ``_target_``: the
stored config is data a stranger may have written (``_target_: numpy.savetxt`` would write a file).
"""

from __future__ import annotations

import functools
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The keys Hydra gives meaning to that a stored config may use; `_recursive_` / `_convert_` are refused.
TARGET, PARTIAL, ARGS = "_target_", "_partial_", "_args_"
# Lightning's words for ckpt_path that are not files (resolved by the trainer itself).
LIGHTNING_CKPT_WORDS = ("last", "best", "hpc", "registry")
# Data settings that write or delete files, set by the command rebuilding a checkpoint's data module and
# never by its stored config (which may come from a stranger, or name another machine's folders): no
# pruning of other caches, data_issues.csv in the run dir, no download (cache_dir is the command's).
RUN_OWNED_DATA = {"keep_caches": None, "report_dir": None, "download": False}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, what is wrong and the fix."""


def _frontends() -> dict[str, Callable[..., Any]]:
    from kws_lightning import features
    from kws_lightning.speech_embedding import SpeechEmbedding

    return {
        f"{features.__name__}.{name}": obj
        for name, obj in vars(features).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == features.__name__
    } | {f"{SpeechEmbedding.__module__}.{SpeechEmbedding.__name__}": SpeechEmbedding}


def _networks() -> dict[str, Callable[..., Any]]:
    # Networks are chosen by `name` through the model registry, which refuses unknown names.
    from kws_lightning.models import build_model

    return {
        "kws_lightning.models.build_model": build_model,
        "kws_lightning.models.registry.build_model": build_model,
    }


def _datamodules() -> dict[str, Callable[..., Any]]:
    from kws_lightning.data.datamodule import SpeechCommandsDataModule

    return {"kws_lightning.data.datamodule.SpeechCommandsDataModule": SpeechCommandsDataModule}


# Per key of the stored config: the only `_target_`s it may name (nested nodes too), by dotted name.
STORED_TARGETS: dict[str, Callable[[], dict[str, Callable[..., Any]]]] = {
    "feature": _frontends,
    "model": _networks,
    "data": _datamodules,
}


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """The checkpoint at `path` as tensors and plain containers; anything else is a `CheckpointError`.

    `weights_only=True` is explicit, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off. `mmap`
    maps the tensors instead of reading them (to check a file, or read its metadata, cheaply).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist: pass ckpt_path=<run dir>/checkpoints/<name>.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if not found:  # not a pickle of objects at all: a damaged file or another format
            detail = re.search(
                r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(error), re.S
            )
            reason = detail.group(1) if detail else str(error).strip().splitlines()[-1]
            raise CheckpointError(
                f"cannot load checkpoint {path}: it is damaged or not a checkpoint ({reason})"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is refused: it holds a reference to {found.group(1)}, which loading would "
            "import or run. A checkpoint is data, not code: only tensors and plain containers are read "
            "(weights_only=True). Do not load it with weights_only=False unless you wrote it yourself; use a "
            "checkpoint written by `python -m kws_lightning.train`"
        ) from None
    except Exception as error:  # torch raises zip / runtime / EOF errors for a damaged file
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"cannot load checkpoint {path}: it holds a {type(checkpoint).__name__}, not a Lightning "
            "checkpoint (a dict with state_dict and hyper_parameters)"
        )
    return checkpoint


def check_resume_checkpoint(
    ckpt_path: str | Path | None, module: nn.Module | None = None
) -> str | Path | None:
    """`ckpt_path` unchanged, once the file (if it is one) opened as data and, given the `module` that is to
    resume from it, its weights found to fit that module (names and shapes, as Lightning's strict load
    needs): a refused checkpoint, or one of another model or config, is named with the reason before
    Lightning opens it (Lightning's own errors name neither)."""
    if ckpt_path and str(ckpt_path) not in LIGHTNING_CKPT_WORDS and Path(ckpt_path).expanduser().is_file():
        checkpoint = load_checkpoint(ckpt_path, mmap=True)
        if module is not None:
            _check_weights_fit(checkpoint, module, ckpt_path)
    return ckpt_path


def _check_weights_fit(checkpoint: Mapping[str, Any], module: nn.Module, path: str | Path) -> None:
    stored = checkpoint.get("state_dict")
    if not isinstance(stored, Mapping):
        raise CheckpointError(
            f"checkpoint {path} has no state_dict: it was not written by kws_lightning.train"
        )
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    found = {name: tuple(getattr(value, "shape", ())) for name, value in stored.items()}
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    resized = [
        f"{name} {found[name]} vs {shape} here"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    if not (missing or unexpected or resized):
        return
    parts = [
        f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("other shapes", resized))
        if names
    ]
    raise CheckpointError(
        f"checkpoint {path} belongs to another model or config: its weights do not fit the model this run "
        f"builds ({'; '.join(parts)}). Resume it with the settings it was trained with (its run dir's "
        "config_resolved.yaml), or drop ckpt_path to start a new run"
    )


def _refuse(path: str | Path, key: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is refused: its stored {key} {why}. A checkpoint's config is data, not "
        "code: it may only name kws-lightning's own front ends, networks (by name) and data modules. Use a "
        "checkpoint written by `python -m kws_lightning.train`, or retrain"
    )


def _check(node: Any, allowed: Mapping[str, Callable[..., Any]], path: str | Path, key: str) -> None:
    """Every `_target_` in `node` (nested mappings, lists, `_args_`) is in `allowed`; raises otherwise."""
    if isinstance(node, Mapping):
        if TARGET in node:
            target = node[TARGET]
            if not isinstance(target, str) or target not in allowed:
                raise _refuse(path, f"{key}.{TARGET}", f"names {target!r}; allowed there: {sorted(allowed)}")
            if not isinstance(node.get(PARTIAL, False), bool):
                raise _refuse(path, f"{key}.{PARTIAL}", "is not true or false")
            if not isinstance(node.get(ARGS, []), list | tuple):
                raise _refuse(path, f"{key}.{ARGS}", "is not a list")
        for name, value in node.items():
            if not isinstance(name, str):
                raise _refuse(path, f"{key}", f"has a key {name!r} that is not a string")
            if name.startswith("_") and name.endswith("_") and name not in (TARGET, PARTIAL, ARGS):
                raise _refuse(path, f"{key}.{name}", "is a Hydra option a stored config may not use")
            if name != TARGET:
                _check(value, allowed, path, f"{key}.{name}")
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            _check(value, allowed, path, f"{key}[{index}]")


def _build(node: Any, allowed: Mapping[str, Callable[..., Any]]) -> Any:
    """Plain values as they are; a `_target_` node as its registry entry called (or partial) on its
    built arguments. Only after `_check` passed on the whole tree."""
    if isinstance(node, Mapping):
        built = {
            name: _build(value, allowed)
            for name, value in node.items()
            if name not in (TARGET, PARTIAL, ARGS)
        }
        if TARGET not in node:
            return built
        args = [_build(value, allowed) for value in node.get(ARGS, [])]
        factory = allowed[node[TARGET]]
        if node.get(PARTIAL, False):
            return functools.partial(factory, *args, **built)
        return factory(*args, **built)
    if isinstance(node, list | tuple):
        return [_build(value, allowed) for value in node]
    return node


def build_stored(config: Mapping[str, Any], key: str, path: str | Path) -> Any:
    """Build ``config[key]`` of a checkpoint's stored config through the registry of `key`
    (`STORED_TARGETS`); any other `_target_`, anywhere in it, is a `CheckpointError` naming `path` and
    the key. No Hydra: nothing is imported by name and no interpolation is resolved."""
    node = config.get(key) if isinstance(config, Mapping) else None
    if not isinstance(node, Mapping) or TARGET not in node:
        raise CheckpointError(
            f"checkpoint {path}: its stored config.{key} is not a config with a _target_: it was not "
            "written by `python -m kws_lightning.train`"
        )
    allowed = STORED_TARGETS[key]()
    _check(node, allowed, path, f"config.{key}")
    return _build(node, allowed)


def stored_datamodule(
    config: Mapping[str, Any],
    path: str | Path,
    data_root: str | None,
    use: str,
    fix: str,
    *,
    cache_dir: str | None,
    **updates: Any,
) -> Any:
    """The data module checkpoint `path` was trained with, rebuilt from its stored `config` (through
    `build_stored`), with `updates` (batch_size, ...) and `data_root` in place of its root. `use` says
    what it is rebuilt for and `fix` what to pass instead, in the errors.

    Where files are written or deleted comes from the running command, never from the file: the wave
    cache goes to `cache_dir` (this run's `paths.cache_dir`; None: decoded in memory), no cache there is
    pruned, data_issues.csv goes to this run's dir, and nothing is downloaded (`RUN_OWNED_DATA`)."""
    data_cfg = dict(config.get("data") or {})
    if TARGET not in data_cfg:
        raise ValueError(f"{path} records no data config: {use} needs one; {fix}")
    data_cfg.update(updates)
    data_cfg.update(RUN_OWNED_DATA, cache_dir=cache_dir)
    if data_root is not None:
        data_cfg["root"] = data_root
    root = data_cfg.get("root")
    if root is not None and not Path(root).expanduser().is_dir():
        raise ValueError(
            f"{use} reads the checkpoint's data set, but its data root {root} is not a folder from "
            f"{Path.cwd()} (relative roots are relative to where training was launched): {fix}"
        )
    return build_stored({"data": data_cfg}, "data", path)


def build_checkpoint_model(
    checkpoint: Mapping[str, Any], path: str | Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The `KWSModel` a checkpoint's hyper-parameters describe (weights not loaded yet), and those
    hyper-parameters with the input format filled in (16 kHz, 1 s clips when absent)."""
    from kws_lightning.utils.instantiate import assemble_kws_model

    hparams = dict(checkpoint.get("hyper_parameters") or {})
    config = hparams.get("config") or {}
    if "labels" not in hparams or not isinstance(config, Mapping) or not {"feature", "model"} <= set(config):
        raise CheckpointError(
            f"{path} lacks labels / config.feature / config.model in its hyper-parameters: it was not "
            "written by `python -m kws_lightning.train`"
        )
    hparams.setdefault("sample_rate", 16000)
    hparams.setdefault("clip_samples", 16000)
    frontend = build_stored(config, "feature", path)
    net_factory = build_stored(config, "model", path)
    model = assemble_kws_model(
        frontend, net_factory, len(hparams["labels"]), num_samples=hparams["clip_samples"]
    )
    return model, hparams
