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


def _stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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
    key = {name: _stamp(path) for name, path in checkpoints.items()}
    cache = folder / SCORES_FILE
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except ValueError:
            cached = {}  # damaged: scored again and rewritten
        if cached.get("version") == SCORES_VERSION and cached.get("checkpoints") == key:
            cached["cached"] = True
            return cached
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    record = _score(checkpoints, fold, num_folds, cache_dir, batch_size, device)
    record.update(version=SCORES_VERSION, fold=fold, checkpoints=key)
    tmp = folder / f".{SCORES_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, cache)
    record["cached"] = False
    return record


def _score(
    checkpoints: dict[str, Path], fold: int, num_folds: int, cache_dir: str, batch_size: int, device: str
) -> dict[str, Any]:
    import numpy as np

    from kws_lightning.data.index import speaker_of
    from kws_lightning.eval import classification_metrics, datamodule_test_set, score
    from kws_lightning.inference import Predictor

    record: dict[str, Any] = {"weights": {}}
    eval_set, data_config, targets = None, None, None
    for name in WEIGHTS:
        predictor = Predictor.from_checkpoints(str(checkpoints[name]), device)
        data = dict(predictor.configs[0].get("data") or {})
        if (data.get("fold"), data.get("num_folds")) != (fold, num_folds):
            raise ValueError(
                f"{checkpoints[name]} was trained with data.fold={data.get('fold')} "
                f"data.num_folds={data.get('num_folds')}, not fold {fold} of {num_folds}: it is not this "
                "fold's checkpoint (delete the fold folder to retrain it)"
            )
        if eval_set is None or data != data_config:
            # The held-out fold as `trainer.test` scored it: rebuilt from the checkpoint's data config.
            eval_set = datamodule_test_set(
                predictor, str(data.get("cache_dir") or cache_dir), batch_size, 0, None, "testing"
            )
            data_config = data
        probs, fold_targets = score(predictor, eval_set)
        if targets is not None and not np.array_equal(targets, fold_targets):
            raise ValueError(f"{checkpoints[name]}: its held-out draw differs from the other checkpoint's")
        targets = fold_targets
        metrics = classification_metrics(fold_targets, probs, predictor.labels)
        correct = int((probs.argmax(axis=1) == fold_targets).sum())
        record["weights"][name] = {
            "accuracy": metrics["accuracy"],
            "correct": correct,
            "macro_f1": metrics["macro_f1"],
            "per_class": metrics["per_class"],
        }
        record["labels"] = list(predictor.labels)
    speakers = {speaker_of(n) for n in eval_set.names if not n.startswith("<silence")}
    record.update(
        held_out_items=len(eval_set.names), held_out_speakers=len(speakers), data=eval_set.description
    )
    return record
