"""Score one finished cv fold on its held-out speakers, with its best-validation checkpoint and with its
final weights (last.ckpt), through `eval`'s own functions; cached in `<fold>/cv_scores.json`.

The cache is keyed by both checkpoints' paths, sizes and modification times: a retrained fold is scored
again, an unchanged one never is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kws_lightning.utils.job_result import JobResult

SCORES_FILE = "cv_scores.json"
WEIGHTS = ("best", "last")
SCORES_VERSION = 1


def fold_checkpoints(folder: Path, result: JobResult) -> dict[str, Path]:
    """The fold's best-validation checkpoint (named in its job_result.json) and last.ckpt. Paths are looked
    up in the fold's own checkpoints/ folder when the recorded one has moved (a relative run dir)."""
    checkpoints = folder / "checkpoints"
    best = Path(result.best_checkpoint) if result.best_checkpoint else None
    if best is not None and not best.is_file():
        best = checkpoints / best.name
    if best is None or not best.is_file():
        found = sorted(checkpoints.glob("best-*.ckpt"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{checkpoints}: expected one best-*.ckpt (the best-validation checkpoint), found "
                f"{[p.name for p in found]}: retrain the fold (delete {folder})"
            )
        best = found[0]
    last = checkpoints / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"{last} is missing: retrain the fold (delete {folder})")
    return {"best": best, "last": last}


def checkpoint_stamp(path: Path) -> dict[str, Any]:
    """What a scores cache is keyed by: a checkpoint's resolved path, size and modification time."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_cached(cache: Path, key: Any, version: int = SCORES_VERSION) -> dict[str, Any] | None:
    """The record in `cache` when it was written for `key` (and this version), else None."""
    if not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
    except ValueError:
        return None  # damaged: scored again and rewritten
    if not isinstance(cached, dict) or cached.get("version") != version or cached.get("checkpoints") != key:
        return None
    cached["cached"] = True
    return cached


def write_cached(cache: Path, record: dict[str, Any]) -> None:
    """Write a scores record atomically (a reader never sees half a file)."""
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, cache)


def score_fold(
    folder: Path,
    fold: int,
    num_folds: int,
    result: JobResult,
    cache_dir: str,
    batch_size: int = 64,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """The fold's held-out scores for both weights (read from `cv_scores.json` when it is current), scored
    with `threads` torch threads (None: torch's default)."""
    checkpoints = fold_checkpoints(folder, result)
    key = {name: checkpoint_stamp(path) for name, path in checkpoints.items()}
    cache = folder / SCORES_FILE
    cached = read_cached(cache, key)
    if cached is not None:
        return cached
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    record = _score(checkpoints, fold, num_folds, cache_dir, batch_size, device)
    record.update(version=SCORES_VERSION, fold=fold, checkpoints=key)
    write_cached(cache, record)
    record["cached"] = False
    return record


def checkpoint_fold(path: Path | str, config: dict[str, Any], fold: int, num_folds: int, fix: str) -> dict:
    """The checkpoint's data config, checked to be fold `fold` of `num_folds` (else a ValueError ending in
    `fix`)."""
    data = dict(config.get("data") or {})
    if (data.get("fold"), data.get("num_folds")) != (fold, num_folds):
        raise ValueError(
            f"{path} was trained with data.fold={data.get('fold')} data.num_folds={data.get('num_folds')}, "
            f"not fold {fold} of {num_folds}: it is not this fold's checkpoint ({fix})"
        )
    return data


def held_out_set(predictor: Any, data: dict[str, Any], cache_dir: str, batch_size: int) -> Any:
    """The held-out fold as `trainer.test` scored it: rebuilt from the checkpoint's data config."""
    from kws_lightning.eval import datamodule_test_set

    return datamodule_test_set(
        predictor, str(data.get("cache_dir") or cache_dir), batch_size, 0, None, "testing"
    )


def weights_entry(probs: Any, targets: Any, labels: list[str]) -> dict[str, Any]:
    """One model's (or ensemble's) figures on a held-out set, as `cv_scores.json` stores them."""
    from kws_lightning.eval import classification_metrics

    metrics = classification_metrics(targets, probs, labels)
    return {
        "accuracy": metrics["accuracy"],
        "correct": int((probs.argmax(axis=1) == targets).sum()),
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
    }


def held_out_facts(eval_set: Any) -> dict[str, Any]:
    """Items, speakers and description of a held-out set."""
    from kws_lightning.data.index import speaker_of

    speakers = {speaker_of(n) for n in eval_set.names if not n.startswith("<silence")}
    return {
        "held_out_items": len(eval_set.names),
        "held_out_speakers": len(speakers),
        "data": eval_set.description,
    }


def _score(
    checkpoints: dict[str, Path], fold: int, num_folds: int, cache_dir: str, batch_size: int, device: str
) -> dict[str, Any]:
    import numpy as np

    from kws_lightning.eval import score
    from kws_lightning.inference import Predictor

    record: dict[str, Any] = {"weights": {}}
    eval_set, data_config, targets = None, None, None
    for name in WEIGHTS:
        predictor = Predictor.from_checkpoints(str(checkpoints[name]), device)
        fix = "delete the fold folder to retrain it"
        data = checkpoint_fold(checkpoints[name], predictor.configs[0], fold, num_folds, fix)
        if eval_set is None or data != data_config:
            eval_set = held_out_set(predictor, data, cache_dir, batch_size)
            data_config = data
        probs, fold_targets = score(predictor, eval_set)
        if targets is not None and not np.array_equal(targets, fold_targets):
            raise ValueError(f"{checkpoints[name]}: its held-out draw differs from the other checkpoint's")
        targets = fold_targets
        record["weights"][name] = weights_entry(probs, fold_targets, predictor.labels)
        record["labels"] = list(predictor.labels)
    record.update(held_out_facts(eval_set))
    return record
