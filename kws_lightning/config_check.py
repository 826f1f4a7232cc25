"""Check a composed training config before anything is built or read: types, ranges, consistent pairs.

`validate_train_config(cfg)` raises `ConfigError` listing every problem as ``key=value: what is allowed``.
Three kinds of check, none of which imports torch or Lightning (the whole check takes well under a second):

- Types and key names come from the code itself: every node with a `_target_` is checked against that
  callable's parameters and type hints, read from its source (`utils/static_signature.py`); a node without
  one is checked against the dataclass or function that consumes it (`SCHEMAS`). A parameter added to a
  constructor is checked as soon as it exists, with no list here to update.
- Ranges that a type hint cannot say (`RANGES`: a batch size >= 1, a probability in [0, 1]) by key pattern;
  a rule whose key is absent from the config does nothing. No number anywhere may be NaN or infinite.
- Pairs of keys that must agree (`CROSS_CHECKS`: data.sample_rate and feature.sample_rate, ...).

Struct mode already rejects a misspelt key on the command line (``data.batch_sise=1``); the signature check
also catches one added with ``+`` or in a new config file.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kws_lightning.utils.static_signature import (
    Signature,
    allowed_values,
    check_value,
    expand_alias,
    module_exists,
    nested_signature,
    read_signature,
)

# Config nodes without a `_target_`, and what consumes them: (callable, called with other arguments too).
SCHEMAS: dict[str, tuple[str, bool]] = {
    "augment": ("kws_lightning.data.augment.AugmentConfig", False),
    "data.synthetic": ("kws_lightning.data.synthetic.ensure_synthetic_dataset", True),
}
_MISSING = object()


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}{self.message}"


class ConfigError(ValueError):
    """Invalid training config; the message lists each bad key, its value and what is allowed."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        if len(problems) == 1:
            text = f"invalid config: {problems[0]}"
        else:
            text = f"invalid config ({len(problems)} problems):\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(text)


def show(value: Any) -> str:
    """A value as it would be typed on the command line; strings quoted so '8000' and 8000 differ."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


# ---- ranges --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Bound:
    """A number in [low, high] (either end open or absent), optionally null or one of a few special values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = False
    special: tuple[Any, ...] = ()
    numbers_only: bool = False  # other types are left to the type check (e.g. trainer.devices="auto")
    meaning: str = ""  # what the special values mean

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"a number in {left}{self.low}, {self.high}{right}"
        elif self.low is not None:
            text = f"a number {'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"a number {'<' if self.high_open else '<='} {self.high}"
        extra = [show(v) for v in self.special] + (["null"] if self.none_ok else [])
        text = f"{text} or {' or '.join(extra)}" if extra else text
        return f"{text} ({self.meaning})" if self.meaning else text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if not _is_number(value):
            return self.numbers_only
        if value in self.special:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


_POSITIVE = Bound(0, low_open=True)
_AT_LEAST_1 = Bound(1)
_NON_NEGATIVE = Bound(0)
_PROBABILITY = Bound(0, 1)
_FRACTION = Bound(0, 1, high_open=True, none_ok=True)
_LIMIT_BATCHES = "an int >= 0 (batches), a float in [0, 1] (a share), or null"

# Key patterns (fnmatch over dotted keys; list items are key.0, key.1, ...) -> allowed numbers.
RANGES: dict[str, Bound] = {
    "data.batch_size": _AT_LEAST_1,
    "data.num_workers": _NON_NEGATIVE,
    "data.decode_threads": _AT_LEAST_1,
    "data.sample_rate": _AT_LEAST_1,
    "data.clip_duration_s": _POSITIVE,
    "data.*_percentage": Bound(0, 100, high_open=True),
    "data.synthetic.clips_per_word": _AT_LEAST_1,
    "data.keep_caches": Bound(1, none_ok=True),
    "feature.sample_rate": _AT_LEAST_1,
    "feature.target_sample_rate": _AT_LEAST_1,
    "feature.n_fft": _AT_LEAST_1,
    "feature.hop_length": _AT_LEAST_1,
    "feature.n_mels": _AT_LEAST_1,
    "feature.n_mfcc": _AT_LEAST_1,
    "feature.fmin": _NON_NEGATIVE,
    "feature.fmax": _POSITIVE,
    "feature.window_ms": _POSITIVE,
    "feature.step_ms": _POSITIVE,
    "feature.amin": _POSITIVE,
    "feature.eps": _POSITIVE,
    "feature.top_db": Bound(0, none_ok=True),
    "feature.pad_ms": _NON_NEGATIVE,
    "feature.lr_scale": _POSITIVE,
    "augment.*.p": _PROBABILITY,
    "augment.*.p_zero": _PROBABILITY,
    "augment.*.max_gain": _NON_NEGATIVE,
    "augment.time_shift.max_fraction": Bound(0, 1),
    "spec_augment.*_masks": _NON_NEGATIVE,
    "spec_augment.*_width": _NON_NEGATIVE,
    "spec_augment.rect_time": _NON_NEGATIVE,
    "spec_augment.rect_freq": _NON_NEGATIVE,
    "mixup.alpha": _POSITIVE,
    "mixup.p": _PROBABILITY,
    "vtlp.p": _PROBABILITY,
    "vtlp.*_factor": _POSITIVE,
    "vtlp.boundary_hz": _POSITIVE,
    "loss.label_smoothing": Bound(0, 1),
    "distill.alpha": Bound(0, 1),
    "distill.temperature": _POSITIVE,
    "optimizer.lr": _POSITIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.momentum": Bound(0, 1),
    "optimizer.dampening": Bound(0, 1),
    "optimizer.eps": _NON_NEGATIVE,
    "optimizer.betas.*": Bound(0, 1, high_open=True),
    "scheduler.total_steps": Bound(1, none_ok=True),
    "scheduler.warmup_steps": _NON_NEGATIVE,
    "scheduler.*_fraction": _FRACTION,
    "scheduler.min_lr_ratio": Bound(0, 1),
    "scheduler.min_lr": _NON_NEGATIVE,
    "scheduler.power": _POSITIVE,
    "scheduler.max_lr": _POSITIVE,
    "scheduler.pct_start": Bound(0, 1, low_open=True, high_open=True),
    "trainer.max_epochs": Bound(1, none_ok=True, special=(-1,), meaning="-1: no limit"),
    "trainer.max_steps": Bound(1, special=(-1,), meaning="-1: no limit, the epochs decide"),
    "trainer.min_epochs": Bound(0, none_ok=True),
    "trainer.min_steps": Bound(0, none_ok=True),
    "trainer.accumulate_grad_batches": _AT_LEAST_1,
    "trainer.check_val_every_n_epoch": Bound(1, none_ok=True),
    "trainer.log_every_n_steps": Bound(1, none_ok=True),
    "trainer.num_sanity_val_steps": Bound(0, none_ok=True, special=(-1,), meaning="-1: all batches"),
    "trainer.gradient_clip_val": Bound(0, none_ok=True),
    "trainer.num_nodes": _AT_LEAST_1,
    "trainer.devices": Bound(1, special=(-1,), numbers_only=True, meaning="-1: every device"),
}


def _check_trainer_fractions(key: str, value: Any) -> str | None:
    """Lightning's int-or-float keys: an int counts batches, a float is a share of the epoch."""
    if value is None or not _is_number(value):
        return None
    if key.endswith("val_check_interval"):
        if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value <= 1:
            return "expected an int >= 1 (batches), a float in (0, 1] (a share of the epoch), or null"
    elif isinstance(value, int) and value < 0 or isinstance(value, float) and not 0 <= value <= 1:
        return f"expected {_LIMIT_BATCHES}"
    return None


RANGE_FUNCTIONS: dict[str, Callable[[str, Any], str | None]] = {
    "trainer.val_check_interval": _check_trainer_fractions,
    "trainer.limit_*_batches": _check_trainer_fractions,
}


# ---- pairs of keys ----------------------------------------------------------------------------------------

Get = Callable[[str], Any]  # a key's value, or _MISSING when absent or already reported


def _numbers(get: Get, *keys: str) -> list[Any] | None:
    values = [get(k) for k in keys]
    return values if all(_is_number(v) for v in values) else None


def _sample_rates(get: Get) -> Iterator[Problem]:
    rates = _numbers(get, "data.sample_rate", "feature.sample_rate")
    if rates and rates[0] != rates[1]:
        yield Problem(
            "data.sample_rate",
            f"={rates[0]} but feature.sample_rate={rates[1]}: clips are resampled to data.sample_rate while "
            "the front end assumes feature.sample_rate. Set both to the same rate, e.g. "
            f"data.sample_rate={rates[0]} feature.sample_rate={rates[0]}",
        )


def _data_source(get: Get) -> Iterator[Problem]:
    if get("data._target_") is _MISSING:
        return
    root, synthetic = get("data.root"), get("data.synthetic")
    if root in (None, _MISSING) and synthetic in (None, _MISSING):
        yield Problem(
            "data.root",
            "=null and data.synthetic=null: no data. Set data.root=PATH to a Speech Commands folder, or use "
            "data=synthetic",
        )
    lengths = _numbers(get, "data.max_clip_s", "data.clip_duration_s")
    if lengths and lengths[0] < lengths[1]:
        yield Problem(
            "data.max_clip_s",
            f"={lengths[0]} is shorter than data.clip_duration_s={lengths[1]}: raise it (null: never crop)",
        )


def _split_percentages(get: Get) -> Iterator[Problem]:
    for first, second, what in (
        ("data.validation_percentage", "data.testing_percentage", "no clips for training"),
        ("data.silence_percentage", "data.unknown_percentage", "no room for keywords in an epoch"),
    ):
        values = _numbers(get, first, second)
        if values and sum(values) >= 100:
            yield Problem(
                first,
                f"={values[0]} + {second}={values[1]} = {sum(values)} >= 100 leaves {what}: keep the sum "
                "below 100",
            )


def _feature_bands(get: Get) -> Iterator[Problem]:
    counts = _numbers(get, "feature.n_mfcc", "feature.n_mels")
    if counts and counts[0] > counts[1]:
        yield Problem(
            "feature.n_mfcc", f"={counts[0]} exceeds feature.n_mels={counts[1]}: allowed 1..{counts[1]}"
        )
    band = _numbers(get, "feature.fmin", "feature.fmax")
    if band and band[0] >= band[1]:
        yield Problem("feature.fmin", f"={band[0]} must be below feature.fmax={band[1]}")
    top = _numbers(get, "feature.fmax", "feature.sample_rate")
    if top and top[0] > top[1] / 2:
        yield Problem(
            "feature.fmax",
            f"={top[0]} is above the Nyquist frequency of feature.sample_rate={top[1]}: allowed up to "
            f"{top[1] / 2:g}",
        )
    frames = _numbers(get, "feature.step_ms", "feature.window_ms")
    if frames and frames[0] > frames[1]:
        yield Problem("feature.step_ms", f"={frames[0]} exceeds feature.window_ms={frames[1]}")


def _white_noise(get: Get) -> Iterator[Problem]:
    levels = _numbers(get, "augment.white_noise.min_db", "augment.white_noise.max_db")
    if levels and levels[0] > levels[1]:
        yield Problem(
            "augment.white_noise.min_db", f"={levels[0]} exceeds augment.white_noise.max_db={levels[1]}"
        )


def _keywords(get: Get) -> Iterator[Problem]:
    from kws_lightning.labels import make_labels

    keywords = get("data.keywords")
    if isinstance(keywords, list):
        try:
            make_labels(keywords)
        except ValueError as error:
            yield Problem("data.keywords", f"={show(keywords)}: {error}")


def _schedule(get: Get) -> Iterator[Problem]:
    fractions = _numbers(get, "scheduler.warmup_fraction", "scheduler.hold_fraction")
    if fractions and sum(fractions) >= 1:
        yield Problem(
            "scheduler.warmup_fraction",
            f"={fractions[0]} + scheduler.hold_fraction={fractions[1]} >= 1 leaves no steps to decay",
        )
    steps, fraction = get("scheduler.warmup_steps"), get("scheduler.warmup_fraction")
    if _is_number(steps) and steps > 0 and _is_number(fraction):
        yield Problem(
            "scheduler.warmup_steps",
            f"={steps} and scheduler.warmup_fraction={fraction}: set one (scheduler.warmup_steps=0 to use "
            "the fraction)",
        )
    total = _numbers(get, "scheduler.warmup_steps", "scheduler.total_steps")
    if total and total[0] >= total[1]:
        yield Problem("scheduler.warmup_steps", f"={total[0]} must be below scheduler.total_steps={total[1]}")


def _trainer_length(get: Get) -> Iterator[Problem]:
    epochs, steps = get("trainer.max_epochs"), get("trainer.max_steps")
    if epochs == -1 and steps == -1:
        yield Problem(
            "trainer.max_epochs",
            "=-1 and trainer.max_steps=-1: the run never ends; set trainer.max_epochs or trainer.max_steps",
        )
    every, interval = get("trainer.check_val_every_n_epoch"), get("trainer.val_check_interval")
    if every is None and interval is not _MISSING and not (isinstance(interval, int) and interval >= 1):
        yield Problem(
            "trainer.val_check_interval",
            f"={show(interval)} with trainer.check_val_every_n_epoch=null: validation every N training "
            "batches needs an int, e.g. trainer.val_check_interval=500",
        )


CROSS_CHECKS: tuple[Callable[[Get], Iterator[Problem]], ...] = (
    _sample_rates,
    _data_source,
    _split_percentages,
    _feature_bands,
    _white_noise,
    _keywords,
    _schedule,
    _trainer_length,
)


# ---- the walk ---------------------------------------------------------------------------------------------


def _plain(node: Any, path: str, raw: Any, problems: list[Problem], sources: dict[str, str]) -> Any:
    """Resolved plain values; a missing (???) or unresolvable value becomes a problem naming its key.
    `sources` collects the interpolations values came from (data.seed <- ${seed}) for the messages."""
    if isinstance(node, DictConfig):
        out = {}
        for key in node.keys():
            full = f"{path}.{key}" if path else str(key)
            raw_child = raw.get(key) if isinstance(raw, dict) else None
            if OmegaConf.is_missing(node, key):
                problems.append(Problem(full, f" is required: set it, e.g. {full}=VALUE"))
                continue
            try:
                child = node[key]
            except Exception as error:  # interpolation / resolver errors
                problems.append(Problem(full, f"={raw_child} cannot be resolved: {error}"))
                continue
            if isinstance(raw_child, str) and "${" in raw_child:
                sources[full] = raw_child
            out[key] = _plain(child, full, raw_child, problems, sources)
        return out
    if isinstance(node, ListConfig):
        items = []
        for index in range(len(node)):
            raw_item = raw[index] if isinstance(raw, list) and index < len(raw) else None
            try:
                items.append(_plain(node[index], f"{path}.{index}", raw_item, problems, sources))
            except Exception as error:
                problems.append(Problem(f"{path}.{index}", f" cannot be resolved: {error}"))
        return items
    return node


def _leaves(values: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, values
    if isinstance(values, dict):
        for key, value in values.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(values, list):
        for index, value in enumerate(values):
            yield from _leaves(value, f"{path}.{index}")


def _is_special(key: Any) -> bool:
    # Hydra's instantiate keys: _target_, _partial_, _convert_, _recursive_, _args_.
    return isinstance(key, str) and key.startswith("_") and key.endswith("_")


def _short(target: str) -> str:
    return target.rpartition(".")[2]


def check_node(signature: Signature, node: dict, path: str, partial: bool) -> Iterator[Problem]:
    """A mapping against a callable's keyword parameters: unknown keys, wrong types, missing ones."""
    name = _short(signature.target)
    for key, value in node.items():
        if _is_special(key):
            continue
        full = f"{path}.{key}"
        param = signature.params.get(key)
        if param is None:
            if signature.open:
                continue
            valid = sorted(signature.params)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            yield Problem(full, f": {name} has no parameter {key!r}{hint}; valid keys: {', '.join(valid)}")
            continue
        if isinstance(value, dict) and "_target_" in value:
            continue  # built by instantiate itself, checked as a node of its own
        nested = nested_signature(signature.module, param.hint) if param.hint is not None else None
        if nested is not None and isinstance(value, dict):
            yield from check_node(nested, value, full, partial=True)
            continue
        if partial and param.required and value is None:
            continue  # a partial's null required argument is filled in by the caller (scheduler.total_steps)
        hint = expand_alias(signature.module, param.hint)
        if check_value(hint, value) is False:
            hint_text = ast.unparse(param.hint)
            allowed = allowed_values(hint)
            expected = f"one of {show(allowed)}" if allowed else hint_text
            yield Problem(full, f"={show(value)}: expected {expected} ({name}'s {key}: {hint_text})")
    if not partial and "_args_" not in node:
        missing = [p.name for p in signature.params.values() if p.required and p.name not in node]
        for key in missing:
            yield Problem(f"{path}.{key}", f" is required by {name}: set {path}.{key}=VALUE")


def _check_targets(values: dict) -> Iterator[Problem]:
    for path, node in _leaves(values):
        if (
            not (isinstance(node, dict) and "_target_" in node)
            or path == "hydra"
            or path.startswith("hydra.")
        ):
            continue
        target = node["_target_"]
        if not isinstance(target, str):
            yield Problem(f"{path}._target_", f"={show(target)}: expected a dotted name")
            continue
        signature = read_signature(target)
        if signature is None:
            if not (module_exists(target.rpartition(".")[0]) or module_exists(target)):
                yield Problem(f"{path}._target_", f"={target}: no module {target.rpartition('.')[0]!r}")
            continue  # not readable statically (compiled, made at run time): instantiate will tell
        yield from check_node(signature, node, path, partial=bool(node.get("_partial_")))


def _check_schemas(values: dict) -> Iterator[Problem]:
    for path, (target, partial) in SCHEMAS.items():
        node = _get(values, path)
        if not isinstance(node, dict):
            continue
        signature = read_signature(target)
        if signature is not None:
            yield from check_node(signature, node, path, partial)


def _get(values: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(values, dict) and part in values:
            values = values[part]
        elif isinstance(values, list) and part.isdigit() and int(part) < len(values):
            values = values[int(part)]
        else:
            return _MISSING
    return values


def _check_ranges(values: dict) -> Iterator[Problem]:
    for key, value in _leaves(values):
        if isinstance(value, dict | list):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            # NaN passes every comparison and inf every lower bound: no setting takes either.
            yield Problem(key, f"={show(value)}: expected a finite number")
            continue
        for pattern, bound in RANGES.items():
            if fnmatch.fnmatchcase(key, pattern) and not bound.accepts(value):
                yield Problem(key, f"={show(value)}: expected {bound.describe()}")
                break
        for pattern, check in RANGE_FUNCTIONS.items():
            message = check(key, value) if fnmatch.fnmatchcase(key, pattern) else None
            if message:
                yield Problem(key, f"={show(value)}: {message}")


def find_problems(cfg: DictConfig) -> list[Problem]:
    """Every problem of a composed training config, at most one per key (the first found)."""
    problems: list[Problem] = []
    raw = OmegaConf.to_container(cfg, resolve=False)
    sources: dict[str, str] = {}
    values = _plain(cfg, "", raw, problems, sources)
    for found in (_check_targets(values), _check_schemas(values), _check_ranges(values)):
        problems.extend(found)
    reported = {p.key for p in problems}

    def get(key: str) -> Any:
        return _MISSING if key in reported else _get(values, key)

    for check in CROSS_CHECKS:
        problems.extend(check(get))
    unique: dict[str, Problem] = {}
    for problem in problems:
        if problem.key in sources and problem.key not in unique:
            problem = Problem(problem.key, f"{problem.message} (its value comes from {sources[problem.key]})")
        unique.setdefault(problem.key, problem)
    return list(unique.values())


def validate_train_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` (every bad key, its value and what is allowed) unless `cfg` can train."""
    problems = find_problems(cfg)
    if problems:
        raise ConfigError(problems)
