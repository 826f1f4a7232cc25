"""`python -m kws_lightning.predict`: Kaggle submissions from a real checkpoint, ensembles and TTA."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from omegaconf import DictConfig

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.inference import CheckpointError, Predictor, TTAConfig
from kws_lightning.predict import predict
from kws_lightning.utils.cli_errors import UsageError


def flat_folder(data_root: Path, out: Path, count: int = 40) -> list[str]:
    """Kaggle's test/audio shape: `count` testing clips copied flat as clip_<n>.wav. Returns their names."""
    out.mkdir(parents=True)
    testing = (data_root / "testing_list.txt").read_text().split()
    picks = [testing[i] for i in np.linspace(0, len(testing) - 1, count).astype(int)]
    names = []
    for k, rel in enumerate(picks):
        names.append(f"clip_{k:05d}.wav")
        shutil.copy(data_root / rel, out / names[-1])
    return names


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: dict) -> Predictor:
    return Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")


def test_submission_with_probs_and_unreadable_clips(
    tiny_checkpoint: dict, predictor: Predictor, run_cli: object, tmp_path: Path
) -> None:
    folder = tmp_path / "audio"
    names = flat_folder(tiny_checkpoint["data_root"], folder)
    (folder / "clip_broken.wav").write_bytes(b"not a wav at all")
    (folder / "clip_empty.wav").write_bytes(b"")
    # A stereo 44.1 kHz clip of 0.7 s: mixed down, resampled and padded like any other.
    stereo = np.stack([read_audio_int16(folder / names[0])[:11200]] * 2, axis=1)
    sf.write(folder / "clip_stereo.wav", np.repeat(stereo, 2, axis=0)[: int(0.7 * 44100)], 44100)
    out = tmp_path / "sub" / "submission.csv"
    result = run_cli(
        "predict",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"input={folder}",
        f"out={out}",
        "probs=true",
        "strict=false",  # two unreadable clips on purpose: still exit 0
        "batch_size=16",
        "num_workers=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    submission = pd.read_csv(out)
    files = sorted(p.name for p in folder.iterdir())
    assert submission["fname"].tolist() == files  # one row per clip, sorted, basenames
    assert list(submission.columns) == ["fname", "label", *predictor.labels]
    assert set(submission["label"]) <= set(predictor.labels)

    # Unreadable clips: a row each (label silence, no posteriors), a stderr summary, data_issues.csv in the
    # run dir.
    bad = submission.set_index("fname").loc[["clip_broken.wav", "clip_empty.wav"]]
    assert (bad["label"] == "silence").all() and bad[predictor.labels].isna().all().all()
    assert "2 of 43 clip(s) could not be read" in result.stderr
    errors = pd.read_csv(tmp_path / "run" / "data_issues.csv")
    assert sorted(errors["path"].map(lambda p: Path(p).name)) == ["clip_broken.wav", "clip_empty.wav"]
    assert (errors["action"] == "skipped").all()
    assert errors["reason"].str.len().min() > 0

    # The readable rows equal the in-process predictor on the decoded clips: labels and posteriors.
    good = submission[~submission["fname"].isin(["clip_broken.wav", "clip_empty.wav"])]
    expected = predictor.predict_arrays([read_audio_int16(folder / f) for f in good["fname"]])
    np.testing.assert_allclose(good[predictor.labels].to_numpy(), expected, atol=2e-6)
    assert good["label"].tolist() == [predictor.labels[k] for k in expected.argmax(1)]
    assert np.allclose(good[predictor.labels].sum(axis=1), 1.0, atol=1e-4)


def compose(config: str, *overrides: str) -> DictConfig:
    """The entry point's config as Hydra composes it for ``python -m kws_lightning.<config> overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


def test_ensemble_tta_and_error_label(
    tiny_checkpoint: dict, predictor: Predictor, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "audio"
    names = flat_folder(tiny_checkpoint["data_root"], folder, count=12)
    (folder / "zz_bad.wav").write_text("garbage")
    ckpt = tiny_checkpoint["ckpt"]
    out = tmp_path / "submission.csv"
    overrides = [f"ckpt_path=[{ckpt},{ckpt}]", f"input={folder}", f"out={out}", "probs=true", "tta=true"]
    overrides.append(f"paths.output_dir={tmp_path / 'run'}")  # no Hydra run dir in-process
    # In-process (the CLI itself runs in the test above): predict() is what main() calls.
    summary = predict(
        compose("predict", *overrides, "error_label=unknown", "num_workers=0", "progress=false")
    )
    assert summary["rows"] == 13 and summary["errors"] == 1
    assert "1 of 13 clip(s) could not be read and were labelled 'unknown'" in capsys.readouterr().err
    submission = pd.read_csv(out).set_index("fname")
    assert submission.loc["zz_bad.wav", "label"] == "unknown"
    # An ensemble of one model twice is that model; TTA averages its five views.
    expected = predictor.predict_arrays([read_audio_int16(folder / n) for n in names], tta=TTAConfig())
    np.testing.assert_allclose(submission.loc[names, predictor.labels].to_numpy(), expected, atol=2e-6)


def test_tta_is_the_mean_of_shifted_and_gain_changed_clips(predictor: Predictor) -> None:
    rng = np.random.default_rng(1)
    clips = [(rng.standard_normal(n) * 3000).astype(np.int16) for n in (16000, 12000, 17000)]
    tta = TTAConfig(shift_ms=100.0, gains_db=(-6.0, 6.0))
    got = predictor.predict_arrays(clips, tta=tta)

    def centred(clip: np.ndarray, shift: int = 0) -> np.ndarray:
        """The 16000-sample window of the clip centred, then moved `shift` samples later (zero fill)."""
        start = (len(clip) - 16000) // 2 - shift
        padded = np.concatenate([np.zeros(32000, np.int16), clip, np.zeros(32000, np.int16)])
        return padded[32000 + start : 32000 + start + 16000].astype(np.float32) / 32768

    views = []
    for clip in clips:
        base = centred(clip)
        views.append(
            [base, centred(clip, 1600), centred(clip, -1600), base * 10 ** (-6 / 20), base * 10 ** (6 / 20)]
        )
    waves = torch.from_numpy(np.clip(np.array(views), -1, 1)).reshape(-1, 16000)
    expected = predictor.posteriors(waves).reshape(3, 5, -1).mean(1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, predictor.predict_arrays(clips), atol=1e-3)  # TTA changes the numbers


def test_ensemble_of_checkpoints_with_other_labels_is_refused(tiny_checkpoint: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(tiny_checkpoint["ckpt"], map_location="cpu", weights_only=True)
    labels = checkpoint["hyper_parameters"]["labels"]
    checkpoint["hyper_parameters"]["labels"] = [*labels[:2], *reversed(labels[2:])]
    other = tmp_path / "reordered.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(CheckpointError, match="disagree on labels") as error:
        Predictor.from_checkpoints([tiny_checkpoint["ckpt"], other], "cpu")
    assert str(labels) in str(error.value) and str(other) in str(error.value)


def test_bad_checkpoint_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.from_checkpoints(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        Predictor.from_checkpoints(junk)
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="not written by `python -m kws_lightning.train`"):
        Predictor.from_checkpoints(tmp_path / "bare.ckpt")


def test_error_label_must_be_a_class(tiny_checkpoint: dict, tmp_path: Path) -> None:
    sf.write(tmp_path / "clip.wav", np.zeros(8000, np.int16), 16000)
    cfg = compose("predict", f"ckpt_path={tiny_checkpoint['ckpt']}", f"input={tmp_path}", "error_label=noise")
    with pytest.raises(
        ValueError, match=r"error_label='noise' is not a class; valid: \['silence', 'unknown'"
    ):
        predict(cfg)


@pytest.mark.parametrize(
    ("target", "force", "refused"),
    [
        ("input clip", False, "is one of the input clips"),
        ("model file", False, "exists and is not a .csv file"),
        ("folder", False, "is a folder: name the file to write"),
        ("folder", True, "is a folder: name the file to write"),
        ("input clip", True, None),
        ("model file", True, None),
        ("old submission", False, None),
    ],
)
def test_out_is_checked_before_anything_is_read(
    tmp_path: Path, target: str, force: bool, refused: str | None
) -> None:
    """Before: out=<an input clip> or out=<any file> was overwritten with the CSV (exit 0), out=<folder>
    failed only after every clip was scored. Now refused before the checkpoint is even opened (a
    missing one here: reaching it shows the check let `out` through), unless force=true."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        sf.write(folder / name, np.zeros(1600, np.int16), 16000)
    (tmp_path / "model.ckpt").write_bytes(b"weights")
    (tmp_path / "old.csv").write_text("fname,label\n")
    (tmp_path / "out_dir").mkdir()
    paths = {
        "input clip": folder / "b.wav",
        "model file": tmp_path / "model.ckpt",
        "folder": tmp_path / "out_dir",
        "old submission": tmp_path / "old.csv",
    }
    out = paths[target]
    before = out.read_bytes() if out.is_file() else None
    cfg = compose(
        "predict", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={folder}", f"out={out}", f"force={force}"
    )
    expected = (UsageError, refused) if refused else (CheckpointError, "missing.ckpt does not exist")
    with pytest.raises(expected[0], match=expected[1]):
        predict(cfg)
    if before is not None:
        assert out.read_bytes() == before
