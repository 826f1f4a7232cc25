"""Bad audio is reported, never silently used: refused with a reason, long clips cropped, all listed."""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from audio_trees import make_training_tree, tone, write_float_wav, write_truncated_wav, write_wav
from scipy.signal import resample_poly

from kws_lightning.data import audio_io
from kws_lightning.data.audio_io import AudioReadError, decode_audio, read_audio_int16
from kws_lightning.data.datamodule import SpeechCommandsDataModule
from kws_lightning.data.issues import ISSUES_FILE
from kws_lightning.data.wave_cache import load_or_build


def refuse_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make `path` unreadable to this process. As root, chmod cannot do it (root reads anything), so the
    module's `open` raises what the OS raises for a chmod 000 file (EACCES); as another user, chmod 000."""
    if os.geteuid() != 0:
        path.chmod(0)
        return

    def fake_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(audio_io, "open", fake_open, raising=False)


def bad_files(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One file per kind of bad audio in `folder`: {file name: words its reason must contain}."""
    write_truncated_wav(folder / "truncated.wav", declared=16000, present=500)
    nan = tone(1.0).astype(np.float32) / 32768
    nan[100:103] = np.nan
    write_float_wav(folder / "nan.wav", nan)
    inf = tone(1.0).astype(np.float32) / 32768
    inf[[5, 9]] = [np.inf, -np.inf]
    write_float_wav(folder / "inf.wav", inf)
    (folder / "dangling.wav").symlink_to(folder / "deleted_long_ago.wav")
    write_wav(folder / "locked.wav", tone(1.0))
    refuse_reading(monkeypatch, folder / "locked.wav")
    (folder / "garbage.wav").write_bytes(b"RIFF\x00\x00 this is not audio")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "folder.wav").mkdir()
    # A 52-byte WAV whose header says 999,999,999 Hz: resampling it once asked for a 149 GiB filter.
    forged = bytearray(write_wav(folder / "forged_rate.wav", tone(1.0)[:4]).read_bytes())
    fmt = forged.index(b"fmt ") + 8
    forged[fmt + 4 : fmt + 12] = struct.pack("<II", 999_999_999, 2 * 999_999_999)
    (folder / "forged_rate.wav").write_bytes(bytes(forged))
    mp3 = io.BytesIO()
    sf.write(mp3, tone(1.0), 16000, format="MP3")
    (folder / "mp3.wav").write_bytes(mp3.getvalue())  # libsndfile would decode it without a word
    return {
        "truncated.wav": "truncated: its header declares 16000 samples, the file holds 500",
        "nan.wav": "non-finite samples (3 NaN, 0 +-Inf)",
        "inf.wav": "non-finite samples (0 NaN, 2 +-Inf)",
        "dangling.wav": "broken link",
        "locked.wav": "permission denied",
        "garbage.wav": "not a readable audio file",
        "empty.wav": "the file is empty (0 bytes)",
        "folder.wav": "is a folder",
        "forged_rate.wav": "sample rate 999999999 Hz is outside the 1000-384000 Hz",
        "mp3.wav": "named .wav but it holds MP3 audio",
    }


def test_each_kind_of_bad_audio_is_refused_with_its_reason(tmp_path, monkeypatch, recwarn):
    expected = bad_files(tmp_path, monkeypatch)
    for name, words in expected.items():
        with pytest.raises(AudioReadError) as error:
            read_audio_int16(tmp_path / name)
        assert words in error.value.reason, (name, error.value.reason)
        assert "System error" not in error.value.reason and "BytesIO" not in error.value.reason
        assert str(tmp_path / name) in str(error.value)
    assert not [w for w in recwarn if "invalid value" in str(w.message)]  # no unnamed numpy warning
    # A header that says "unknown length" (streaming writers: 0 or 0xFFFFFFFF) is not "truncated".
    good = write_wav(tmp_path / "ok.wav", tone(0.5))
    streamed = bytearray(good.read_bytes())
    data_at = streamed.index(b"data")
    streamed[data_at + 4 : data_at + 8] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    np.testing.assert_array_equal(read_audio_int16(tmp_path / "streamed.wav"), tone(0.5))


def test_ten_minute_clip_is_cropped_to_its_centre(tmp_path):
    minutes = np.tile(tone(1.0, 300), 600)
    minutes[len(minutes) // 2 - 24000 : len(minutes) // 2 + 24000] = tone(3.0, 700)  # the centre 3 s
    long_clip = write_wav(tmp_path / "ten_minutes.wav", minutes)
    decoded = decode_audio(long_clip, 16000, max_samples=48000)
    np.testing.assert_array_equal(decoded.samples, tone(3.0, 700))
    assert decoded.note == "cropped from 600.00 s to its centre 3.00 s (max_clip_s)"
    # Resampled files are cropped too, to exactly max_samples at the target rate.
    write_wav(tmp_path / "long_44k.wav", np.tile(tone(1.0, 300, rate=44100), 20), rate=44100)
    assert len(read_audio_int16(tmp_path / "long_44k.wav", 16000, max_samples=48000)) == 48000
    assert decode_audio(write_wav(tmp_path / "short.wav", tone(1.0)), 16000, 48000).note is None


def test_an_awkward_rate_is_resampled_with_bounded_factors(tmp_path, monkeypatch):
    """383,999 Hz is a legal rate, but 16000/383999 as polyphase factors is a 7.7M-tap filter (1.4 s,
    370 MB for a 2-sample body); the nearest ratio with factors <= 1000 is used instead."""
    factors = []

    def spy(samples, up, down, *args, **kwargs):
        factors.append((up, down))
        return resample_poly(samples, up, down, *args, **kwargs)

    monkeypatch.setattr(audio_io, "resample_poly", spy)
    clip = write_wav(tmp_path / "awkward.wav", tone(1.0, rate=383_999), rate=383_999)
    assert abs(len(read_audio_int16(clip)) - 16000) <= 16000 * 5e-4  # the rate is at most 0.05 % off
    write_wav(tmp_path / "cd.wav", tone(1.0, rate=44100), rate=44100)
    assert len(read_audio_int16(tmp_path / "cd.wav")) == 16000
    assert max(factors[0]) <= audio_io.MAX_RESAMPLE_FACTOR and factors[1] == (160, 441)  # usual: exact


def test_datamodule_lists_every_skipped_and_cropped_clip_and_trains_on_neither(tmp_path, monkeypatch, caplog):
    root = make_training_tree(tmp_path / "sc", {"yes": 20, "no": 20, "bed": 20})
    expected = bad_files(root / "yes", monkeypatch)
    (root / "yes" / "folder.wav").rmdir()  # glob("*.wav") would index it; the rest are files or links
    del expected["folder.wav"]
    write_wav(root / "no" / "long_nohash_0.wav", np.tile(tone(1.0, 600), 600))  # 10 minutes
    monkeypatch.chdir(tmp_path)
    dm = SpeechCommandsDataModule(
        root=str(root), keywords=["yes", "no"], cache_dir=None, report_dir=str(tmp_path / "run")
    )
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
        dm.setup("fit")
    issues = pd.read_csv(tmp_path / "run" / ISSUES_FILE)
    reasons = {Path(p).name: (a, r) for p, a, r in issues.itertuples(index=False)}
    assert set(reasons) == {*expected, "long_nohash_0.wav"}  # every file, not the first three
    for name, words in expected.items():
        assert reasons[name][0] == "skipped" and words in reasons[name][1]
    assert reasons["long_nohash_0.wav"] == (
        "cropped",
        "cropped from 600.00 s to its centre 3.00 s (max_clip_s)",
    )
    assert dm.cache.lengths.max() == 48000  # the long clip pads no batch beyond max_clip_s
    skipped_rows = dm.dataset.clips["path"].map(lambda p: Path(p).name).isin(list(expected))
    assert not dm.dataset.clips.loc[skipped_rows, "ok"].any()
    training_ids = set(dm.train_sampler.epoch_items().tolist())
    assert not training_ids & set(np.flatnonzero(skipped_rows.to_numpy()).tolist())
    assert sum("skipped 9 of 70 clips" in m for m in caplog.messages) == 1
    assert sum("cropped 1 of 70 clips" in m for m in caplog.messages) == 1
    # cache_dir=None decodes in memory: nothing is written where the command was launched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sc"]


def test_data_keys_are_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"data.max_clip_s=0.5 is shorter than data.clip_duration_s=1.0"):
        SpeechCommandsDataModule(root="x", max_clip_s=0.5)
    with pytest.raises(ValueError, match=r"data.verify_cache='always' is not a mode"):
        SpeechCommandsDataModule(root="x", verify_cache="always")
    with pytest.raises(ValueError, match="needs data.cache_dir"):
        SpeechCommandsDataModule(synthetic={"clips_per_word": 5}, cache_dir=None)


def test_cache_records_skipped_and_cropped_clips(tmp_path):
    clips = [str(write_wav(tmp_path / "a.wav", tone(1.0))), str(write_truncated_wav(tmp_path / "b.wav"))]
    clips.append(str(write_wav(tmp_path / "c.wav", np.tile(tone(1.0), 20))))
    cache = load_or_build(clips, tmp_path / "cache", max_samples=48000)
    assert cache.lengths.tolist() == [16000, 0, 48000]
    assert [(Path(i.path).name, i.action) for i in cache.issues] == [
        ("b.wav", "skipped"),
        ("c.wav", "cropped"),
    ]


# ---- predict: exit codes, the issues CSV in the run dir, never a user's file touched ----------------


def predict_folder(tiny_checkpoint: dict, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Four good clips, one 10-minute clip and one of each kind of bad file (no chmod trick: subprocess)."""
    testing = (tiny_checkpoint["data_root"] / "testing_list.txt").read_text().split()[:4]
    for k, rel in enumerate(testing):
        write_wav(folder / f"good_{k}.wav", read_audio_int16(tiny_checkpoint["data_root"] / rel))
    write_wav(folder / "long.wav", np.tile(read_audio_int16(tiny_checkpoint["data_root"] / testing[0]), 600))
    expected = bad_files(folder, monkeypatch)
    for name in ("locked.wav", "folder.wav"):  # a subprocess is not monkeypatched; a folder is no file
        del expected[name]
    (folder / "folder.wav").rmdir()
    (folder / "locked.wav").unlink()
    return expected


def test_predict_exit_status_issues_csv_and_user_files_untouched(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "audio"
    expected = predict_folder(tiny_checkpoint, folder, monkeypatch)
    out = tmp_path / "mine" / "submission.csv"
    out.parent.mkdir()
    user_files = {"predict_errors.csv": "my own notes\n", ISSUES_FILE: "also mine\n"}
    for name, text in user_files.items():
        (out.parent / name).write_text(text)
    common = [f"ckpt_path={tiny_checkpoint['ckpt']}", f"out={out}", "num_workers=0", "progress=false"]

    strict = run_cli("predict", *common, f"input={folder}", f"hydra.run.dir={tmp_path / 'r1'}", cwd=tmp_path)
    assert strict.returncode == 3, strict.stderr[-3000:]
    assert f"{len(expected)} of {len(expected) + 5} input clip(s) could not be read" in strict.stderr
    assert "strict=false" in strict.stderr
    issues = pd.read_csv(tmp_path / "r1" / ISSUES_FILE)
    reasons = {Path(p).name: (a, r) for p, a, r in issues.itertuples(index=False)}
    assert set(reasons) == {*expected, "long.wav"}
    for name, words in expected.items():
        assert reasons[name][0] == "skipped" and words in reasons[name][1]
    assert reasons["long.wav"][0] == "cropped"
    submission = pd.read_csv(out).set_index("fname")
    assert (submission.loc[list(expected), "label"] == "silence").all()
    for name, text in user_files.items():  # nothing beside `out` was removed or rewritten
        assert (out.parent / name).read_text() == text

    lenient = run_cli(
        "predict",
        *common,
        f"input={folder}",
        "strict=false",
        f"hydra.run.dir={tmp_path / 'r2'}",
        cwd=tmp_path,
    )
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert "could not be read and were labelled 'silence'" in lenient.stderr
    assert set(pd.read_csv(tmp_path / "r2" / ISSUES_FILE)["path"].map(lambda p: Path(p).name)) == set(reasons)

    only_bad = tmp_path / "only_bad"
    write_truncated_wav(only_bad / "t.wav")
    (only_bad / "g.wav").write_bytes(b"nope")
    hopeless = run_cli(
        "predict",
        *common,
        f"input={only_bad}",
        "strict=false",
        f"hydra.run.dir={tmp_path / 'r3'}",
        cwd=tmp_path,
    )
    assert hopeless.returncode == 3
    assert "none of the 2 input clip(s) could be read" in hopeless.stderr
    for name, text in user_files.items():
        assert (out.parent / name).read_text() == text


def test_listen_names_a_broken_link(tiny_checkpoint: dict, run_cli: object, tmp_path: Path) -> None:
    (tmp_path / "stream.wav").symlink_to(tmp_path / "gone.wav")
    result = run_cli(
        "listen", f"ckpt_path={tiny_checkpoint['ckpt']}", f"input={tmp_path / 'stream.wav'}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "broken link" in result.stderr and "Traceback" not in result.stderr


def test_eval_lists_skipped_and_cropped_clips_and_still_scores(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    from kws_lightning.inference import Predictor

    keywords = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu").keywords
    root = tiny_checkpoint["data_root"]
    testing = (root / "testing_list.txt").read_text().split()
    folder = tmp_path / "test_set"
    for word in keywords:
        for rel in [r for r in testing if r.startswith(f"{word}/")][:2]:
            write_wav(folder / rel, read_audio_int16(root / rel))
    write_truncated_wav(folder / keywords[0] / "cut_short.wav")
    write_wav(folder / keywords[1] / "long.wav", np.tile(tone(1.0), 600))
    write_wav(folder / "_silence_" / "zero.wav", np.zeros(16000, np.int16))
    result = run_cli(
        "eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"input={folder}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    issues = pd.read_csv(tmp_path / "run" / ISSUES_FILE)
    assert [(Path(p).name, a) for p, a in zip(issues["path"], issues["action"], strict=True)] == [
        ("cut_short.wav", "skipped"),
        ("long.wav", "cropped"),
    ]
    assert "1 unreadable clip(s) skipped" in result.stdout
