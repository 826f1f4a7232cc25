"""The detector's settings (RecognizeCommands' smoothing, threshold, suppression; optional per-keyword
thresholds): TF's defaults, the tuned ones stored in a checkpoint or written to a detector.json, and what a
command line overrides.

Tuned settings live in the checkpoint as ``hyper_parameters["detector"]``: a plain dict of numbers and a
{keyword: threshold} dict, so the checkpoint still loads with ``weights_only=True``; they are checked
(names, ranges, keywords of the checkpoint) before use, as anything read from a file is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kws_lightning.checkpoints import CheckpointError, load_checkpoint

STORED_KEY = "detector"  # hyper_parameters[STORED_KEY]
NUMBERS = ("average_window_ms", "detection_threshold", "suppression_ms", "minimum_count")


@dataclass(frozen=True)
class DetectorSettings:
    average_window_ms: float = 500.0
    detection_threshold: float = 0.7
    suppression_ms: float = 500.0
    minimum_count: int = 3
    keyword_thresholds: dict[str, float] = field(default_factory=dict)  # overrides detection_threshold

    def recognizer(self, labels: Sequence[str]) -> Any:
        from kws_lightning.listen import RecognizeCommands

        return RecognizeCommands(
            labels,
            self.average_window_ms,
            self.detection_threshold,
            self.suppression_ms,
            self.minimum_count,
            keyword_thresholds=self.keyword_thresholds or None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["keyword_thresholds"] = dict(self.keyword_thresholds)
        return out


def parse_settings(stored: Any, where: str, labels: Sequence[str]) -> DetectorSettings:
    """Stored settings, checked: a mapping of known names to finite numbers in range; per-keyword
    thresholds only for keywords in `labels`. Anything else is a CheckpointError naming `where`."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: its stored detector settings ({STORED_KEY}) {why}. Re-run "
            "`python -m kws_lightning.stream_eval ... tune=true`, or pass the settings on the command line"
        )

    if not isinstance(stored, Mapping):
        raise refuse(f"are a {type(stored).__name__}, not a mapping")
    known = {f.name for f in fields(DetectorSettings)}
    extra = sorted(str(k) for k in stored if k not in known and k != "tuned_on")
    if extra:
        raise refuse(f"name unknown settings {extra}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name in NUMBERS:
        if name not in stored:
            continue
        value = stored[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise refuse(f"hold {name}={value!r}, not a finite number")
        values[name] = int(value) if name == "minimum_count" else float(value)
    thresholds = stored.get("keyword_thresholds") or {}
    if not isinstance(thresholds, Mapping):
        raise refuse("hold keyword_thresholds that are not a {keyword: threshold} mapping")
    unknown = sorted(str(k) for k in thresholds if k not in list(labels)[2:])
    if unknown:
        raise refuse(f"name keywords {unknown} the model does not have (its keywords: {list(labels)[2:]})")
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise refuse(f"hold the threshold {value!r} for {name!r}, not a number in [0, 1]")
    settings = DetectorSettings(
        **values, keyword_thresholds={str(k): float(v) for k, v in thresholds.items()}
    )
    if settings.average_window_ms <= 0 or settings.minimum_count < 1 or settings.suppression_ms < 0:
        raise refuse("need average_window_ms > 0, suppression_ms >= 0 and minimum_count >= 1")
    return settings


def stored_settings(ckpt_paths: Sequence[str | Path], labels: Sequence[str]) -> DetectorSettings | None:
    """The tuned settings of a single checkpoint, or None (none stored, or an ensemble: settings tuned for
    one model do not carry over to an average of several)."""
    if len(ckpt_paths) != 1:
        return None
    checkpoint = load_checkpoint(ckpt_paths[0], mmap=True)
    stored = (checkpoint.get("hyper_parameters") or {}).get(STORED_KEY)
    return None if stored is None else parse_settings(stored, str(ckpt_paths[0]), labels)


def exported_settings(
    metadata: Mapping[str, Any], where: str, labels: Sequence[str]
) -> DetectorSettings | None:
    """The tuned settings an exported model's metadata carries (`kws_lightning.export` copies them from
    the checkpoint), checked as a checkpoint's are; None when it has none."""
    stored = metadata.get(STORED_KEY)
    return None if stored is None else parse_settings(stored, where, labels)


def file_settings(path: str | Path, labels: Sequence[str]) -> DetectorSettings:
    """The settings in a `detector.json` (what `stream_eval ... tune=true` writes, e.g. for an ensemble,
    whose members' checkpoints cannot hold settings tuned for their average), checked as stored ones are."""
    import json

    where = Path(path).expanduser()
    fix = "pass the detector.json a `python -m kws_lightning.stream_eval ... tune=true` run wrote"
    if not where.is_file():
        raise ValueError(f"detector_file={path}: no such file; {fix}")
    try:
        stored = json.loads(where.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"detector_file={path}: not JSON ({err}); {fix}") from None
    return parse_settings(stored, str(where), labels)


def resolve_settings(
    cfg: Mapping[str, Any],
    ckpt_paths: Sequence[str | Path],
    labels: Sequence[str],
    export_metadata: Mapping[str, Any] | None = None,
) -> tuple[DetectorSettings, str]:
    """The detector settings to use and where they came from: each setting given in `cfg` (not null)
    wins, then those of `cfg.detector_file` (a detector.json), then the tuned settings of the checkpoint
    (or, with `export_metadata`, of the exported model), then TF's defaults. An explicit
    `detection_threshold` also drops stored per-keyword thresholds (the user asked for one threshold)."""
    detector_file = cfg.get("detector_file")
    if detector_file:
        stored = file_settings(detector_file, labels)
        holder = f"detector file {detector_file}"
    elif export_metadata is not None:
        stored = exported_settings(export_metadata, "the exported model's metadata", labels)
        holder = "tuned settings stored in the exported model"
    else:
        stored = stored_settings(ckpt_paths, labels)
        holder = "tuned settings stored in the checkpoint"
    base = stored or DetectorSettings()
    given = {name: cfg[name] for name in NUMBERS if cfg.get(name) is not None}
    if "detection_threshold" in given:
        base = replace(base, keyword_thresholds={})
    if cfg.get("keyword_thresholds"):
        given["keyword_thresholds"] = dict(cfg["keyword_thresholds"])
    settings = parse_settings({**base.to_dict(), **given}, "the command line", labels)
    source = holder if stored is not None else "defaults"
    if given:
        source += f", overridden: {sorted(given)}"
    return settings, source


def predictor_settings(cfg: Mapping[str, Any], predictor: Any) -> tuple[DetectorSettings, str]:
    """`resolve_settings` for a `Predictor`: tuned settings from its checkpoint, or from its exported
    model's metadata (model_path=)."""
    from kws_lightning.export import ExportedRunner

    runner = predictor.models[0] if len(predictor.models) == 1 else None
    if isinstance(runner, ExportedRunner):
        return resolve_settings(cfg, [], predictor.labels, runner.metadata)
    return resolve_settings(cfg, predictor.paths, predictor.labels)


def store_settings(ckpt_path: str | Path, out_path: Path, settings: DetectorSettings, tuned_on: dict) -> Path:
    """A copy of the checkpoint with the settings in hyper_parameters (plain data only)."""
    import torch

    checkpoint = load_checkpoint(ckpt_path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams[STORED_KEY] = {**settings.to_dict(), "tuned_on": tuned_on}
    checkpoint["hyper_parameters"] = hparams
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out_path)
    return out_path
