"""`python -m kws_lightning.predict ckpt_path=CKPT input=DIR [out=submission.csv]`: label a folder of clips.

Writes a Kaggle submission (``fname,label``, one row per ``*.wav`` of the flat folder `input`, sorted by
name; ``probs=true`` adds one posterior column per class). Files are decoded a batch at a time in
DataLoader workers while the main process runs the model on whole batches. ``ckpt_path=[a,b]`` averages
an ensemble, ``tta=true`` averages test-time augmented copies. A file that cannot be read still gets a
row (label `error_label`) and is listed in ``predict_errors.csv`` beside the output.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)
ERRORS_FILE = "predict_errors.csv"


def output_path(cfg: DictConfig) -> Path:
    """`out` as given (relative to the launch directory), or submission.csv in the run dir."""
    return Path(cfg.out).expanduser() if cfg.get("out") else Path(cfg.paths.output_dir) / "submission.csv"


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Label every clip of `cfg.input`, write the submission and the error list. Returns a summary."""
    import numpy as np
    import pandas as pd
    import torch

    from kws_lightning.data.index import index_unlabeled
    from kws_lightning.inference import Predictor, TTAConfig, checkpoint_paths

    if not cfg.get("input"):
        raise ValueError("input is required: input=DIR, a folder of .wav clips (e.g. Kaggle's test/audio)")
    files = index_unlabeled(cfg.input)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    predictor = Predictor.from_checkpoints(checkpoint_paths(cfg.ckpt_path), cfg.device)
    if cfg.error_label not in predictor.labels:
        raise ValueError(f"error_label={cfg.error_label!r} is not a class; valid: {predictor.labels}")
    out = output_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tta = TTAConfig.from_mapping(cfg.tta_options) if cfg.tta else None

    started = time.perf_counter()
    probs, errors = predictor.predict_files(
        files["path"].tolist(), cfg.batch_size, cfg.num_workers, tta, progress=cfg.progress
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

    errors_path = out.parent / ERRORS_FILE
    if errors:
        pd.DataFrame(
            {
                "fname": files["fname"].to_numpy()[error_rows],
                "path": files["path"].to_numpy()[error_rows],
                "reason": list(errors.values()),
            }
        ).to_csv(errors_path, index=False)
        first = "; ".join(f"{files['fname'].iat[i]} ({r})" for i, r in list(errors.items())[:3])
        print(
            f"{len(errors)} of {len(files)} clip(s) could not be read and were labelled "
            f"{cfg.error_label!r}: see {errors_path}. First: {first}",
            file=sys.stderr,
        )
    elif errors_path.exists():
        errors_path.unlink()  # a stale list from an earlier run would be misleading

    counts = submission["label"].value_counts().to_dict()
    print(f"wrote {out}: {len(submission)} rows, {len(errors)} unreadable")
    print(f"labels: {counts}")
    print(f"throughput: {len(files) / seconds:.1f} clips/s ({seconds:.1f} s)")
    return {"out": str(out), "rows": len(submission), "errors": len(errors), "seconds": seconds}


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
