"""`python -m kws_lightning.eval`: real runs of the CLI on a checkpoint from a real (tiny) training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from omegaconf import DictConfig

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.data.index import DataLayoutError
from kws_lightning.eval import check_keywords, classification_metrics, evaluate, folder_test_set
from kws_lightning.inference import Predictor
from kws_lightning.labels import BACKGROUND_NOISE_DIR, DEFAULT_KEYWORDS


def run_dir_of(stdout: str) -> Path:
    return Path(next(line for line in stdout.splitlines() if line.startswith("run dir: "))[9:])


def make_test_layout(data_root: Path, out: Path, per_word: int = 3, silence: int = 4) -> Path:
    """An official-test-set folder from the synthetic set's testing list: keyword folders, `_unknown_`
    (other words, renamed ``<word>_<file>`` as the real archive does) and `_silence_` (noise slices)."""
    testing = (data_root / "testing_list.txt").read_text().split()
    taken: dict[str, int] = {}
    for rel in testing:
        word, name = rel.split("/")
        if taken.get(word, 0) >= per_word:
            continue
        taken[word] = taken.get(word, 0) + 1
        target = out / word / name if word in DEFAULT_KEYWORDS else out / "_unknown_" / f"{word}_{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / rel, target)
    noise = read_audio_int16(sorted((data_root / BACKGROUND_NOISE_DIR).glob("*.wav"))[0])
    (out / "_silence_").mkdir()
    for k in range(silence):
        sf.write(out / "_silence_" / f"noise_{k}.wav", noise[k * 16000 : (k + 1) * 16000] // 4, 16000)
    return out


def test_default_eval_reproduces_the_training_test_accuracy(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    result = run_cli(
        "eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"paths.cache_dir={tiny_checkpoint['cache_dir']}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir_of(result.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    # Same clips, same fixed silence / unknown draw, same centred input path: trainer.test's number.
    assert metrics["accuracy"] == pytest.approx(tiny_checkpoint["test_acc"], abs=5e-5)
    assert f"accuracy {metrics['accuracy']:.4f} on {metrics['n_clips']} clips" in result.stdout

    matrix = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert list(matrix.columns) == list(matrix.index) == metrics["labels"]
    counts = matrix.to_numpy()
    assert counts.sum() == metrics["n_clips"]
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["accuracy"])
    for i, label in enumerate(metrics["labels"]):
        row = metrics["per_class"][label]
        assert row["support"] == counts[i].sum()
        if counts[i].sum():
            assert row["recall"] == pytest.approx(counts[i, i] / counts[i].sum())
        if counts[:, i].sum():
            assert row["precision"] == pytest.approx(counts[i, i] / counts[:, i].sum())
    # The test draw holds pre-drawn silence and unknown words, as in training.
    assert counts[0].sum() > 0 and counts[1].sum() > 0
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    wrong = pd.read_csv(out / "misclassified.csv")
    assert len(wrong) == metrics["n_clips"] - np.trace(counts)
    assert list(wrong.columns) == ["file", "true", "top1", "p1", "top2", "p2", "top3", "p3"]
    assert (wrong["true"] != wrong["top1"]).all()
    assert (wrong["p1"] >= wrong["p2"]).all() and (wrong["p2"] >= wrong["p3"]).all()
    assert wrong["file"].str.match(r"^(\w+/\w+_nohash_\d+\.wav|<silence #\d+>)$").all()


def test_split_validation_reproduces_the_checkpoints_validation_accuracy(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    ckpt = Path(tiny_checkpoint["ckpt"])
    result = run_cli(
        "eval",
        f"ckpt_path={ckpt}",
        "split=validation",
        f"paths.cache_dir={tiny_checkpoint['cache_dir']}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir_of(result.stdout) / "metrics.json").read_text())
    assert "validation split" in metrics["data"]
    # The best checkpoint is named after its val/acc (4 decimals): the validation draw scores it again.
    val_acc = float(ckpt.stem.rsplit("-acc", 1)[1])
    assert metrics["accuracy"] == pytest.approx(val_acc, abs=6e-5)


def test_split_is_checked(tiny_checkpoint: dict) -> None:
    cfg = compose("eval", f"ckpt_path={tiny_checkpoint['ckpt']}", "split=train")
    with pytest.raises(ValueError, match=r"split must be one of \('testing', 'validation'\), got 'train'"):
        evaluate(cfg)


def compose(config: str, *overrides: str) -> DictConfig:
    """The entry point's config as Hydra composes it for ``python -m kws_lightning.<config> overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


def test_eval_on_an_official_test_set_folder(
    tiny_checkpoint: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = make_test_layout(tiny_checkpoint["data_root"], tmp_path / "test_set")
    (folder / "yes" / "broken.wav").write_bytes(b"RIFF but not audio")
    # In-process (the CLI itself runs in the test above): evaluate() is what main() calls.
    evaluate(
        compose(
            "eval",
            f"ckpt_path={tiny_checkpoint['ckpt']}",
            f"input={folder}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'run'}",
        )
    )
    stdout = capsys.readouterr().out
    assert "official test-set layout" in stdout and "1 unreadable clip(s) skipped" in stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    wavs = sorted(p for p in folder.rglob("*.wav") if p.name != "broken.wav")
    assert metrics["n_clips"] == len(wavs)
    supports = {label: row["support"] for label, row in metrics["per_class"].items()}
    assert supports["silence"] == 4 and supports["yes"] == 3
    assert supports["unknown"] == len(list((folder / "_unknown_").glob("*.wav")))

    # The same clips scored in-process, one array at a time: the same predictions.
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    probs = predictor.predict_arrays([read_audio_int16(p) for p in wavs])
    truth = [{"_silence_": "silence", "_unknown_": "unknown"}.get(p.parent.name, p.parent.name) for p in wavs]
    labels = np.array(predictor.labels)
    expected_wrong = {
        f"{p.parent.name}/{p.name}"
        for p, t, k in zip(wavs, truth, probs.argmax(1), strict=True)
        if labels[k] != t
    }
    assert set(pd.read_csv(tmp_path / "run" / "misclassified.csv")["file"]) == expected_wrong
    assert metrics["accuracy"] == pytest.approx(1 - len(expected_wrong) / len(wavs))


def test_training_layout_folder_scores_its_testing_list(tiny_checkpoint: dict, tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    root = tiny_checkpoint["data_root"]
    eval_set = folder_test_set(predictor, str(root), str(tmp_path / "cache"), batch_size=64, num_workers=0)
    testing = sorted((root / "testing_list.txt").read_text().split())
    assert sorted(eval_set.names) == testing
    assert "its testing list" in eval_set.description
    batches = list(eval_set.batches)
    targets = np.concatenate([b["targets"].numpy() for b in batches])
    assert len(targets) == len(testing) and (targets != 0).all()  # clips only: no silence class here


def test_folder_for_other_keywords_is_an_error_naming_both_lists(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        check_keywords(["cat", "dog"], list(DEFAULT_KEYWORDS), tmp_path)
    message = str(error.value)
    assert "['cat', 'dog']" in message and str(list(DEFAULT_KEYWORDS)) in message
    check_keywords(["yes", "no"], list(DEFAULT_KEYWORDS), tmp_path)  # a subset only warns


def test_flat_folder_is_refused_with_a_pointer_to_predict(tiny_checkpoint: dict, tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    sf.write(tmp_path / "clip_1.wav", np.zeros(16000, np.int16), 16000)
    with pytest.raises(ValueError, match="kws_lightning.predict"):
        folder_test_set(predictor, str(tmp_path), None, 8, 0)
    with pytest.raises(DataLayoutError, match="does not exist"):
        folder_test_set(predictor, str(tmp_path / "missing"), None, 8, 0)


def test_metrics_by_hand() -> None:
    labels = ["silence", "unknown", "yes"]
    targets = np.array([0, 0, 1, 2, 2, 2])
    probs = np.eye(3)[[0, 2, 1, 2, 2, 0]]
    metrics = classification_metrics(targets, probs, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class"]["silence"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["per_class"]["yes"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["yes"]["recall"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["unknown"]["f1"] == pytest.approx(1.0)
    empty = classification_metrics(np.array([0]), np.eye(3)[[0]], labels)["per_class"]["yes"]
    assert empty == {"precision": None, "recall": None, "f1": None, "support": 0}
