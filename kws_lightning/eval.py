"""`python -m kws_lightning.eval ckpt_path=CKPT [input=DIR]`: score a checkpoint on a labelled test set.

Without `input` the checkpoint's own data set is rebuilt from its data config and scored on its fixed
test draw (testing clips + the same share of unknown words and pre-drawn silence as `trainer.test`
used, so the accuracy is the training run's test/acc); `split=validation` scores its validation draw.
With `input=DIR` the folder is scored as it is: an official test-set folder (``_silence_/``,
``_unknown_/``, keyword folders), or a training-layout folder (its testing list when it has one, else
every clip).

Prints what produced each checkpoint (its provenance record: code version, libraries, data index hash,
command). Writes to the run dir (logs/eval/runs/<timestamp>): metrics.json (with those records),
confusion_matrix.csv / .png, misclassified.csv (file, true label, top-3 labels with posteriors) and
det_clips.csv / .json / .png (per-keyword one-vs-rest DET of the clip scores; the stream view is stream_eval).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

log = logging.getLogger(__name__)
TOP_K = 3


@dataclass
class EvalSet:
    """What is scored: a name per item (file path relative to its root, or ``<silence #k>``), batches of
    ``{"waves": int16 (B, L), "lengths": (B,), "targets": (B,)}`` in the same order, and a description."""

    names: list[str]
    batches: Iterable[dict[str, Any]]
    description: str


SPLITS = ("testing", "validation")


def datamodule_test_set(
    predictor: Any,
    cache_dir: str,
    batch_size: int,
    num_workers: int,
    data_root: str | None = None,
    split: str = "testing",
    extra_training_roots: Sequence[str] | None = None,
) -> EvalSet:
    """The checkpoint's own fixed draw of `split` (testing or validation), rebuilt by
    `SpeechCommandsDataModule` from its data config (by `kws_lightning.checkpoints.build_stored`: only a
    registered data module, never whatever `_target_` the checkpoint names). `extra_training_roots` (None:
    the checkpoint's own) replaces its extra training folders, which never change the draw."""
    from kws_lightning.checkpoints import stored_datamodule

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    extra = {} if extra_training_roots is None else {"extra_training_roots": list(extra_training_roots)}

    datamodule = stored_datamodule(
        predictor.configs[0],
        predictor.paths[0],
        data_root,
        f"scoring its {split} split",
        "pass data_root=PATH, or score a folder with input=DIR",
        cache_dir=cache_dir,  # this run's: never the checkpoint's (kws_lightning/checkpoints.py)
        batch_size=batch_size,
        num_workers=num_workers,
        **extra,
    )
    if datamodule.labels != predictor.labels:
        raise ValueError(
            f"the data config rebuilds labels {datamodule.labels}, but the checkpoint predicts "
            f"{predictor.labels}: the checkpoint's config was edited or is inconsistent"
        )
    datamodule.prepare_data()
    datamodule.setup("test")
    clips = datamodule.dataset.clips
    items = datamodule.eval_items[split]
    names = [clips["rel"].iat[i] if i >= 0 else f"<silence #{-1 - i}>" for i in items.tolist()]
    counts = datamodule.class_counts(split)
    description = f"{datamodule.dataset.root} {split} split + its fixed silence/unknown draw: {counts}"
    loader = datamodule.test_dataloader() if split == "testing" else datamodule.val_dataloader()
    return EvalSet(names, loader, description)


def check_keywords(folder_keywords: Sequence[str], keywords: Sequence[str], folder: Path) -> None:
    """A folder made for other keywords is an error; a partial overlap is scored with a warning."""
    extra = sorted(set(folder_keywords) - set(keywords))
    missing = [k for k in keywords if k not in set(folder_keywords)]
    if extra and missing:
        raise ValueError(
            f"{folder} was made for other keywords than the checkpoint: its keyword folders are "
            f"{sorted(folder_keywords)}, the checkpoint's keywords are {list(keywords)} "
            f"(the folder lacks {missing}; the checkpoint does not know {extra}). "
            "Score it with a checkpoint trained on those keywords."
        )
    if missing:
        log.warning("%s has no clips of the keyword(s) %s: their recall is undefined", folder, missing)
    if extra:
        log.warning("folders %s of %s are not keywords of this checkpoint: scored as unknown", extra, folder)


def folder_test_set(
    predictor: Any, folder: str, cache_dir: str | None, batch_size: int, num_workers: int
) -> EvalSet:
    """A labelled folder: official test-set layout, or training layout (testing list, else all clips)."""
    from torch.utils.data import DataLoader

    from kws_lightning.data.dataset import ClipBatches, keep_batch
    from kws_lightning.data.index import (
        TEST_SET_SILENCE_DIR,
        TEST_SET_UNKNOWN_DIR,
        detect_layout,
        index_test_layout,
        index_training_layout,
    )
    from kws_lightning.data.issues import hydra_run_dir, report_issues
    from kws_lightning.data.wave_cache import DEFAULT_MAX_CLIP_S, load_or_build

    layout = detect_layout(folder)
    if layout == "test":
        root = Path(folder).expanduser().resolve()
        special = {TEST_SET_SILENCE_DIR, TEST_SET_UNKNOWN_DIR}
        words = [
            d.name for d in root.iterdir() if d.is_dir() and d.name not in special and any(d.glob("*.wav"))
        ]
        check_keywords(words, predictor.keywords, root)
        clips = index_test_layout(root, predictor.keywords).clips
        description = f"{root} (official test-set layout)"
    elif layout == "training":
        dataset = index_training_layout(folder, predictor.keywords)
        present = set(dataset.clips["word"])
        missing = [k for k in predictor.keywords if k not in present]
        if missing:
            log.warning("%s has no clips of the keyword(s) %s: their recall is undefined", folder, missing)
        if dataset.split_source == "lists":
            clips = dataset.split("testing")
            description = f"{dataset.root} (training layout, its testing list)"
        else:
            clips = dataset.clips
            description = f"{dataset.root} (training layout without lists: every clip)"
    else:
        raise ValueError(
            f"{folder} is a flat folder of unlabelled clips: nothing to score against. Use "
            "`python -m kws_lightning.predict input=...` to label them"
        )
    if clips.empty:
        raise ValueError(f"{description}: no clips to score")
    # Long clips cropped to their centre (what is scored); skipped and cropped files go to data_issues.csv.
    max_samples = max(int(DEFAULT_MAX_CLIP_S * predictor.sample_rate), predictor.clip_samples)
    cache = load_or_build(list(clips["path"]), cache_dir, predictor.sample_rate, max_samples=max_samples)
    report_issues(cache.issues, len(clips), hydra_run_dir())
    ok = np.flatnonzero(cache.ok)
    if len(ok) == 0:
        raise ValueError(f"{description}: none of its {len(clips)} clips could be decoded")
    names = clips["rel"].to_numpy()[ok].tolist()
    loader = DataLoader(
        ClipBatches(cache, clips["target"].to_numpy()),
        batch_size=batch_size,
        sampler=ok.tolist(),
        collate_fn=keep_batch,
        num_workers=num_workers,
    )
    skipped = len(clips) - len(ok)
    return EvalSet(
        names, loader, description + (f", {skipped} unreadable clip(s) skipped" if skipped else "")
    )


def score(predictor: Any, eval_set: EvalSet, tta: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Posteriors (N, classes) and targets (N,) over the whole set, in its order."""
    probs, targets = [], []
    for batch in eval_set.batches:
        probs.append(predictor.posteriors_int16(batch["waves"], batch["lengths"], tta).cpu().numpy())
        targets.append(batch["targets"].numpy())
    return np.concatenate(probs), np.concatenate(targets)


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class)."""
    flat = np.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def classification_metrics(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, clip count and per-class precision / recall / F1 / support (None where undefined)."""
    preds = probs.argmax(axis=1)
    matrix = confusion_matrix(targets, preds, len(labels))
    per_class = {}
    for index, label in enumerate(labels):
        hits, predicted, support = matrix[index, index], matrix[:, index].sum(), matrix[index].sum()
        precision, recall = _ratio(hits, predicted), _ratio(hits, support)
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    f1s = [c["f1"] for c in per_class.values() if c["f1"] is not None]
    return {
        "accuracy": float((preds == targets).mean()),
        "n_clips": int(len(targets)),
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": per_class,
    }


def write_confusion(matrix: np.ndarray, labels: Sequence[str], out_dir: Path) -> tuple[Path, Path]:
    """confusion_matrix.csv (rows true, columns predicted) and a row-normalised confusion_matrix.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    csv_path = out_dir / "confusion_matrix.csv"
    frame = pd.DataFrame(matrix, index=list(labels), columns=list(labels))
    frame.index.name = "true\\predicted"
    frame.to_csv(csv_path)

    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = 1.0 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            color = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(f"accuracy {np.trace(matrix) / max(matrix.sum(), 1):.4f} ({matrix.sum()} clips)")
    fig.tight_layout()
    png_path = out_dir / "confusion_matrix.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def write_misclassified(
    names: Sequence[str], targets: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Path
) -> int:
    """misclassified.csv: file, true label, then the top-3 labels with their posteriors. Returns the count."""
    import pandas as pd

    wrong = np.flatnonzero(probs.argmax(axis=1) != targets)
    top = np.argsort(-probs[wrong], axis=1, kind="stable")[:, :TOP_K]
    table = {"file": [names[i] for i in wrong], "true": [labels[targets[i]] for i in wrong]}
    for k in range(TOP_K):
        table[f"top{k + 1}"] = [labels[j] for j in top[:, k]]
        table[f"p{k + 1}"] = np.round(probs[wrong, top[:, k]], 5)
    pd.DataFrame(table).to_csv(path, index=False)
    return len(wrong)


def format_report(metrics: dict[str, Any]) -> str:
    lines = [
        f"accuracy {metrics['accuracy']:.4f} on {metrics['n_clips']} clips",
        f"{'class':>12} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}",
    ]
    for label, row in metrics["per_class"].items():
        cells = [f"{row[k]:.4f}" if row[k] is not None else "-" for k in ("precision", "recall", "f1")]
        lines.append(f"{label:>12} {cells[0]:>9} {cells[1]:>7} {cells[2]:>7} {row['support']:>8}")
    return "\n".join(lines)


def checkpoint_provenance(paths: Sequence[str]) -> dict[str, Any]:
    """Print what produced each checkpoint (code, libraries, data index, command); returns the records by
    path, without their config (already in the checkpoint), for metrics.json."""
    from kws_lightning.utils.provenance import describe, read_checkpoint_provenance

    records: dict[str, Any] = {}
    for path in paths:
        try:
            record = read_checkpoint_provenance(path)
        except Exception as error:  # an unreadable record must not stop the scoring
            record, note = None, f"  provenance: unreadable ({type(error).__name__}: {error})"
        else:
            note = describe(record)
        print(f"checkpoint: {path}\n{note}")
        records[path] = {k: v for k, v in (record or {}).items() if k != "config"} or None
    return records


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score, print, and write the report files into `cfg.paths.output_dir`. Returns the metrics."""
    from kws_lightning.inference import Predictor, TTAConfig
    from kws_lightning.stream_bench.clip_det import write_clip_det

    # ckpt_path=CKPT, or model_path= an exported .onnx (float or int8) / .pt, scored the same way.
    predictor = Predictor.from_config(
        cfg.get("ckpt_path"), cfg.get("model_path"), cfg.device, trust_code=bool(cfg.get("trust_code", False))
    )
    provenance = {} if cfg.get("model_path") else checkpoint_provenance(predictor.paths)
    split = cfg.get("split", "testing")
    if cfg.get("input"):
        if split != "testing":
            raise ValueError(f"split={split} scores the checkpoint's own data set: drop input=DIR, or split")
        # input=test_v0.02 / test_v0.01: the official test set's folder under paths.data_dir (download=true
        # fetches it first; kws_lightning/data/provision.py).
        from kws_lightning.data.provision import resolve_test_set_input

        folder = resolve_test_set_input(str(cfg.input), cfg.paths.data_dir, bool(cfg.get("download", False)))
        eval_set = folder_test_set(predictor, folder, cfg.paths.cache_dir, cfg.batch_size, cfg.num_workers)
    else:
        eval_set = datamodule_test_set(
            predictor,
            cfg.paths.cache_dir,
            cfg.batch_size,
            cfg.num_workers,
            cfg.get("data_root"),
            split,
            cfg.get("extra_training_roots"),
        )
    log.info("scoring %s", eval_set.description)
    tta = TTAConfig.from_mapping(cfg.tta_options) if cfg.tta else None
    probs, targets = score(predictor, eval_set, tta)

    metrics = classification_metrics(targets, probs, predictor.labels)
    metrics.update(
        checkpoints=predictor.paths, labels=predictor.labels, data=eval_set.description, tta=bool(cfg.tta)
    )
    metrics["provenance"] = provenance
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["clip_det"] = write_clip_det(targets, probs, predictor.labels, out_dir)  # det_clips.*
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    matrix = confusion_matrix(targets, probs.argmax(axis=1), len(predictor.labels))
    write_confusion(matrix, predictor.labels, out_dir)
    wrong = write_misclassified(
        eval_set.names, targets, probs, predictor.labels, out_dir / "misclassified.csv"
    )

    print(f"data: {eval_set.description}")
    print(format_report(metrics))
    print(f"misclassified: {wrong}")
    print(f"run dir: {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from kws_lightning.utils.cli_errors import one_line_errors

    # A refused checkpoint, input=test_v0.0X that cannot be fetched, a data folder (root, extra training
    # roots) not where the checkpoint says: one line naming the fix, exit status 1.
    with one_line_errors(code=1):
        return evaluate(cfg)["accuracy"]


if __name__ == "__main__":
    main()
