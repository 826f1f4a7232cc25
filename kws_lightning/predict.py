"""`python -m kws_lightning.predict ckpt_path=CKPT input=DIR [out=submission.csv]`: label a folder of clips.

Writes a Kaggle submission (``fname,label``, one row per ``*.wav`` of the flat folder `input`, sorted by
name; ``probs=true`` adds one posterior column per class). Files are decoded a batch at a time in
DataLoader workers while the main process runs the model on whole batches. ``ckpt_path=[a,b]`` averages
an ensemble, ``tta=true`` averages test-time augmented copies.

Bad input is reported, never silently used: a file that cannot be read or is refused (truncated,
non-finite samples, broken link, permission denied, ...) still gets a row (label `error_label`, no
posteriors); a file longer than `max_clip_s` is cropped to its centre (the window that is scored).
Both are listed in ``data_issues.csv`` in the run dir (path, action, reason; never next to `out`, never
deleting anything there). The command exits with status 3 when any file failed (unless
``strict=false``) and whenever every file failed.

`out` is checked before anything is decoded: a folder, one of the input clips or an existing file that is
not a .csv is refused (``force=true`` replaces the last two).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from kws_lightning.utils.cli_errors import UsageError

log = logging.getLogger(__name__)
EXIT_INPUT_FAILED = 3  # some (strict) or all input files could not be used


def output_path(cfg: DictConfig) -> Path:
    """`out` as given (relative to the launch directory), or submission.csv in the run dir."""
    return Path(cfg.out).expanduser() if cfg.get("out") else Path(cfg.paths.output_dir) / "submission.csv"


def check_output(out: Path, input_dir: str | Path, names: Sequence[str], force: bool = False) -> None:
    """Refuse, before any clip is decoded, an `out` the submission could not be written to (a folder, a
    folder it cannot write in) or would destroy: one of the input clips `names` of `input_dir`, or any
    existing file that is not a .csv (a previous submission is replaced). `force` allows the last two."""
    if out.is_dir():
        raise UsageError(f"out={out} is a folder: name the file to write, e.g. out={out / 'submission.csv'}")
    if out.exists() and not force:
        target = out.resolve()
        if target.parent == Path(input_dir).expanduser().resolve() and target.name in set(names):
            raise UsageError(
                f"out={out} is one of the input clips: writing the submission would replace it. Choose "
                "another file (outside the input folder), or pass force=true"
            )
        if target.suffix.lower() != ".csv":
            raise UsageError(
                f"out={out} exists and is not a .csv file: writing the submission would replace it. "
                "Choose another file name, or pass force=true to replace it"
            )
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise UsageError(f"out={out}: cannot write in {folder} (permission denied): choose another folder")


def run_dir(cfg: DictConfig) -> Path:
    """This run's folder (data_issues.csv goes there); outside a Hydra run, set `paths.output_dir`."""
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # ${hydra:runtime.output_dir} does not resolve without a Hydra run (compose API)
        raise ValueError(
            "predict() outside `python -m kws_lightning.predict` needs paths.output_dir=DIR: its run dir, "
            "where data_issues.csv is written"
        ) from None


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Label every clip of `cfg.input`, write the submission and the error list. Returns a summary."""
    import numpy as np
    import pandas as pd
    import torch

    from kws_lightning.data.index import index_unlabeled
    from kws_lightning.data.issues import CROPPED, SKIPPED, ClipIssue, write_issues_csv
    from kws_lightning.inference import Predictor, TTAConfig, checkpoint_paths

    if not cfg.get("input"):
        raise ValueError("input is required: input=DIR, a folder of .wav clips (e.g. Kaggle's test/audio)")
    files = index_unlabeled(cfg.input)
    if cfg.get("out"):  # the default, <run dir>/submission.csv, is in a new folder: nothing to check
        check_output(output_path(cfg), cfg.input, files["fname"].tolist(), bool(cfg.get("force", False)))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    predictor = Predictor.from_checkpoints(checkpoint_paths(cfg.ckpt_path), cfg.device)
    if cfg.error_label not in predictor.labels:
        raise ValueError(f"error_label={cfg.error_label!r} is not a class; valid: {predictor.labels}")
    issues_dir = run_dir(cfg)
    out = output_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tta = TTAConfig.from_mapping(cfg.tta_options) if cfg.tta else None

    max_clip_s = cfg.get("max_clip_s")
    max_samples = None
    if max_clip_s is not None:
        # Never below the model's window: cropping is then lossless for what is scored (TTA shifts too).
        max_samples = max(int(round(max_clip_s * predictor.sample_rate)), predictor.clip_samples)
    repaired: dict[int, str] = {}
    started = time.perf_counter()
    probs, errors = predictor.predict_files(
        files["path"].tolist(),
        cfg.batch_size,
        cfg.num_workers,
        tta,
        progress=cfg.progress,
        max_samples=max_samples,
        repaired=repaired,
    )
    seconds = time.perf_counter() - started

    labels = np.asarray(predictor.labels)
    error_rows = np.fromiter(errors.keys(), np.int64, len(errors))
    predicted = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
    submission = pd.DataFrame({"fname": files["fname"], "label": labels[predicted]})
    submission.loc[error_rows, "label"] = cfg.error_label
    if cfg.probs:
        for index, label in enumerate(predictor.labels):
            submission[label] = np.round(probs[:, index], 6)
    submission.to_csv(out, index=False)

    paths = files["path"].to_numpy()
    issues = [ClipIssue(paths[i], SKIPPED, r) for i, r in sorted(errors.items())]
    issues += [ClipIssue(paths[i], CROPPED, n) for i, n in sorted(repaired.items())]
    # In the run dir, under this command's own name: never beside `out`, where a user's file may be.
    issues_path = write_issues_csv(issues, issues_dir) if issues else None
    if errors:
        first = "; ".join(f"{files['fname'].iat[i]} ({r})" for i, r in sorted(errors.items())[:3])
        print(
            f"{len(errors)} of {len(files)} clip(s) could not be read and were labelled "
            f"{cfg.error_label!r}: see {issues_path}. First: {first}",
            file=sys.stderr,
        )
    if repaired:
        print(
            f"{len(repaired)} clip(s) longer than max_clip_s={max_clip_s} were cropped to their centre: "
            f"see {issues_path}",
            file=sys.stderr,
        )

    counts = submission["label"].value_counts().to_dict()
    print(f"wrote {out}: {len(submission)} rows, {len(errors)} unreadable")
    print(f"labels: {counts}")
    print(f"throughput: {len(files) / seconds:.1f} clips/s ({seconds:.1f} s)")
    return {
        "out": str(out),
        "rows": len(submission),
        "errors": len(errors),
        "repaired": len(repaired),
        "issues": str(issues_path) if issues_path else None,
        "seconds": seconds,
    }


def input_failure(summary: dict[str, Any], strict: bool) -> str | None:
    """Why predict must exit non-zero (every input failed; or any did and `strict`), else None."""
    failed, total = summary["errors"], summary["rows"]
    if failed and failed == total:
        return f"none of the {total} input clip(s) could be read (see {summary['issues']})"
    if failed and strict:
        return (
            f"{failed} of {total} input clip(s) could not be read (see {summary['issues']}); their rows "
            "carry error_label. Fix or remove them, or pass strict=false to accept the submission as it is"
        )
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from kws_lightning.utils.cli_errors import one_line_errors

    with one_line_errors(code=2):
        summary = predict(cfg)
    problem = input_failure(summary, bool(cfg.get("strict", True)))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_INPUT_FAILED)


if __name__ == "__main__":
    main()
