"""The synthetic Speech Commands generator: layout, audio, determinism, splits, caching, CLI."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kws_lightning.data import espeak, synthetic
from kws_lightning.labels import BACKGROUND_NOISE_DIR

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "bed", "marvin"]
CLIPS = 4
NOISE_SECONDS = 2.0
NAME_RE = re.compile(r"^([0-9a-f]{8})_nohash_(\d+)\.wav$")


def tf_split(relpath: str) -> str:
    """The brief's rule, written out independently of the generator."""
    speaker = Path(relpath).name.split("_nohash_")[0]
    percent = int(hashlib.sha1(speaker.encode()).hexdigest(), 16) % (2**27) * (100 / (2**27 - 1))
    return "validation" if percent < 10 else "testing" if percent < 20 else "training"


def clip_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*.wav") if p.parent.name != BACKGROUND_NOISE_DIR)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Small shards so even this tiny set runs as several shards over two worker processes.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "CLIPS_PER_SHARD", 24)
        return synthetic.generate_dataset(
            tmp_path_factory.mktemp("syn") / "set",
            words=WORDS,
            clips_per_word=CLIPS,
            seed=0,
            noise_seconds=NOISE_SECONDS,
            workers=2,
        )


def test_layout(tiny: Path) -> None:
    folders = sorted(p.name for p in tiny.iterdir() if p.is_dir())
    assert folders == sorted([*WORDS, BACKGROUND_NOISE_DIR])
    for word in WORDS:
        names = sorted(p.name for p in (tiny / word).iterdir())
        assert len(names) == CLIPS
        assert all(NAME_RE.match(n) for n in names), names
    noises = sorted(p.name for p in (tiny / BACKGROUND_NOISE_DIR).iterdir())
    assert noises == ["brown_noise.wav", "hum_50hz.wav", "hum_60hz.wav", "pink_noise.wav", "white_noise.wav"]
    for name in noises:
        audio, rate = sf.read(tiny / BACKGROUND_NOISE_DIR / name, dtype="int16")
        assert rate == 16000 and audio.ndim == 1 and len(audio) == NOISE_SECONDS * 16000
        rms = np.sqrt(np.mean((audio / 32768.0) ** 2))
        assert 0.001 < rms < 0.02, (name, rms)  # about the real files' level (~-50 dBFS)
    hum = sf.read(tiny / BACKGROUND_NOISE_DIR / "hum_50hz.wav")[0]
    spectrum = np.abs(np.fft.rfft(hum))
    assert np.argmax(spectrum[1:400]) + 1 in (100, 300)  # 0.5 Hz bins: the 50 or 150 Hz line dominates
    info = json.loads((tiny / synthetic.METADATA_FILE).read_text())
    assert info["clips"] == len(WORDS) * CLIPS
    assert info["params"] == {"words": WORDS, "clips_per_word": CLIPS, "seed": 0, "noise_seconds": 2.0}


def test_clip_format_and_content(tiny: Path) -> None:
    onsets = []
    for path in clip_paths(tiny):
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), path
        assert 8000 <= info.frames <= 16000, path
        audio = sf.read(path, dtype="int16")[0] / 32768.0
        assert np.sqrt(np.mean(audio**2)) > 0.003, path
        assert np.abs(audio).max() > 0.05, path
        frames = np.sqrt(np.mean(audio[: len(audio) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
        # The noise floor is light: the loudest 10 ms is well above the quietest.
        assert 20 * np.log10(frames.max() / frames.min()) > 15, path
        onsets.append(np.argmax(frames > 0.1 * frames.max()) * 160 / 16000)
    assert np.std(onsets) > 0.1 and max(onsets) - min(onsets) > 0.4, onsets


def test_short_clips_are_a_small_fraction() -> None:
    # Rendered in this process (no files): 300 clips of the default plan.
    clips = synthetic._plan(synthetic.DEFAULT_WORDS, 10, 3, synthetic._variants())[:300]
    renderer = synthetic._ClipRenderer()
    lengths = np.array([len(renderer.render(c)) for c in clips])
    assert 0.02 <= np.mean(lengths < 16000) <= 0.12
    assert lengths.min() >= 8000 and lengths.max() == 16000


def test_deterministic_whatever_the_worker_count(tiny: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "CLIPS_PER_SHARD", 24)
        again = synthetic.generate_dataset(
            tmp_path / "again",
            words=WORDS,
            clips_per_word=CLIPS,
            seed=0,
            noise_seconds=NOISE_SECONDS,
            workers=1,
        )
    first, second = tree_bytes(tiny), tree_bytes(again)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []


def test_splits_speaker_disjoint_and_follow_the_hash_rule(tiny: Path) -> None:
    validation = (tiny / "validation_list.txt").read_text().splitlines()
    testing = (tiny / "testing_list.txt").read_text().splitlines()
    assert validation and testing  # speakers are drawn so every split gets some
    every = {str(p.relative_to(tiny)) for p in clip_paths(tiny)}
    assert set(validation) | set(testing) <= every
    assert set(validation) == {p for p in every if tf_split(p) == "validation"}
    assert set(testing) == {p for p in every if tf_split(p) == "testing"}
    speakers = {
        s: {NAME_RE.match(Path(p).name)[1] for p in lst} for s, lst in [("v", validation), ("t", testing)]
    }
    training = {NAME_RE.match(Path(p).name)[1] for p in every - set(validation) - set(testing)}
    assert not (speakers["v"] & speakers["t"]) and not (training & (speakers["v"] | speakers["t"]))


def test_speakers_repeat_words_a_few_times_numbered_from_zero(tiny: Path) -> None:
    for word in WORDS:
        said: dict[str, list[int]] = {}
        for path in (tiny / word).iterdir():
            speaker, n = NAME_RE.match(path.name).groups()
            said.setdefault(speaker, []).append(int(n))
        assert len(said) >= 2
        for ns in said.values():
            assert sorted(ns) == list(range(len(ns))) and len(ns) <= len(synthetic.REPEAT_PROBS)
    speakers = json.loads((tiny / synthetic.METADATA_FILE).read_text())["speakers"]
    assert len({s["voice"] for s in speakers.values()}) >= 3


def test_ensure_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"words": ["yes", "no", "bed"], "clips_per_word": 2, "seed": 1, "noise_seconds": 1.0}
    key = synthetic.dataset_key(**params)
    stale = tmp_path / f".synthetic-{key}.tmp-999999999"  # an interrupted run by a dead process
    (stale / "yes").mkdir(parents=True)
    first = synthetic.ensure_synthetic_dataset(tmp_path, **params)
    assert first == tmp_path / f"synthetic-{key}"
    assert (first / synthetic.COMPLETE_MARKER).is_file() and len(clip_paths(first)) == 6
    assert not stale.exists() and [p.name for p in tmp_path.iterdir()] == [first.name]
    stamps = {p: p.stat().st_mtime_ns for p in [first, *first.rglob("*")]}

    def must_not_run(*args, **kwargs):
        raise AssertionError("generate_dataset ran again for a cached set")

    monkeypatch.setattr(synthetic, "generate_dataset", must_not_run)
    assert synthetic.ensure_synthetic_dataset(tmp_path, **params) == first
    assert {p: p.stat().st_mtime_ns for p in [first, *first.rglob("*")]} == stamps
    assert synthetic.dataset_key(**{**params, "seed": 2}) != key


def test_ensure_replaces_an_unmarked_folder(tmp_path: Path) -> None:
    params = {"words": ["go"], "clips_per_word": 1, "seed": 0, "noise_seconds": 1.0}
    half = tmp_path / f"synthetic-{synthetic.dataset_key(**params)}"
    (half / "go").mkdir(parents=True)  # no marker: must not be reused
    root = synthetic.ensure_synthetic_dataset(tmp_path, **params)
    assert root == half and (root / synthetic.COMPLETE_MARKER).is_file() and len(clip_paths(root)) == 1


def test_cli_writes_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "kws_lightning.data.synthetic", f"out={out}", "seed=3"]
    done = subprocess.run(
        [*cmd, "clips_per_word=2", "words=[yes,no]", "noise_seconds=1", "workers=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"wrote 4 clips .* in \d+\.\d s", done.stdout), done.stdout
    assert len(list((out / "yes").glob("*.wav"))) == 2 and len(list((out / "no").glob("*.wav"))) == 2
    assert (out / "validation_list.txt").is_file() and (out / "testing_list.txt").is_file()
    assert len(list((out / BACKGROUND_NOISE_DIR).glob("*.wav"))) == 5


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert synthetic.main([f"out={tmp_path / 'full'}", "words=[yes]"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert synthetic.main([f"out={tmp_path / 'new'}", "words=[yes,Two]"]) == 2
    err = capsys.readouterr().err
    assert "'Two'" in err and "lowercase" in err and "usage:" in err
    assert synthetic.main([f"out={tmp_path / 'new'}", "clips=3"]) == 2
    assert "unexpected argument 'clips=3'" in capsys.readouterr().err
    assert synthetic.main(["seed=1"]) == 2
    assert "out=DIR is required" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"words": ["yes", "1"]}, "'1' has characters other than a-z"),
        ({"words": ["yes", "Yes"]}, "'Yes' has characters other than a-z"),
        ({"words": ["go", "go"]}, "repeat ['go']"),
        ({"words": []}, "words is empty"),
        ({"clips_per_word": 0}, "clips_per_word=0"),
        ({"seed": -1}, "seed=-1"),
        ({"noise_seconds": 0.5}, "noise_seconds=0.5"),
    ],
)
def test_bad_parameters_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synthetic.generate_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic.generate_dataset(tmp_path, words=["go"], clips_per_word=1, noise_seconds=1)
    with pytest.raises(FileExistsError, match="holds no synthetic.json"):
        synthetic.generate_dataset(tmp_path, words=["go"], clips_per_word=1, noise_seconds=1, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_missing_espeak_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import now fails
    with pytest.raises(espeak.EspeakError, match="pip install espeakng-loader"):
        espeak.library_and_data_paths()


def test_espeak_binding_speaks_and_rejects_unknown_voices() -> None:
    engine = espeak.get_engine()
    assert engine.sample_rate == 22050
    audio = engine.synth("stop", voice="en-us+f2", rate=175, pitch=60)
    assert audio.dtype == np.int16 and 0.15 * 22050 < len(audio) < 1.0 * 22050
    assert np.abs(audio).max() > 3000
    slow = engine.synth("stop", voice="en-us+f2", rate=90, pitch=60)
    assert len(slow) > 1.3 * len(audio)
    with pytest.raises(espeak.EspeakError, match="no voice 'xx-nowhere'"):
        engine.synth("stop", voice="xx-nowhere")
    with pytest.raises(espeak.EspeakError, match="pitch=150 is outside"):
        engine.synth("stop", voice="en", pitch=150)
    assert {"m1", "f1", "klatt", "whisper", "croak"} <= set(espeak.available_variants())
