"""The streaming benchmark: stream building, the vectorised detector against RecognizeCommands, scoring
against a ground truth with known answers, detector settings stored in a checkpoint, eval's clip DET, and
`stream_eval` (and its tune mode, and `listen` picking the tuned settings up) end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kws_lightning.checkpoints import CheckpointError
from kws_lightning.listen import RecognizeCommands
from kws_lightning.stream_bench.clip_det import one_vs_rest, roc_auc
from kws_lightning.stream_bench.scoring import (
    count,
    curve_of,
    decide,
    det_auc,
    keyword_peaks,
    match,
    miss_at,
    miss_floor,
    smooth,
)
from kws_lightning.stream_bench.settings import (
    DetectorSettings,
    parse_settings,
    resolve_settings,
    store_settings,
)
from kws_lightning.stream_bench.streams import (
    SAMPLE_RATE,
    ClipPool,
    StreamRecipe,
    build_stream,
    load_pool,
    noise_track,
)

LABELS = ["silence", "unknown", "yes", "no", "up", "go"]


# ---- the detector, vectorised, against RecognizeCommands fed one window at a time -----------------------


def peaky_posteriors(count: int, seed: int) -> np.ndarray:
    """Runs of one class (2-29 windows) with noisy posteriors: near-threshold scores included."""
    rng = np.random.default_rng(seed)
    rows, label = [], 0
    while len(rows) < count:
        label = int(rng.integers(len(LABELS)))
        for _ in range(int(rng.integers(2, 30))):
            logits = rng.normal(0, 1.5, len(LABELS))
            logits[label] += rng.uniform(0, 8)
            rows.append(np.exp(logits) / np.exp(logits).sum())
    return np.array(rows[:count])


@pytest.mark.parametrize(
    "settings",
    [
        DetectorSettings(),
        DetectorSettings(300, 0.5, 250, 2),
        DetectorSettings(1000, 0.8, 1500, 5),
        DetectorSettings(500, 0.6, 500, 3, keyword_thresholds={"yes": 0.9, "go": 0.4}),
    ],
)
def test_vectorised_decisions_equal_recognize_commands(settings: DetectorSettings) -> None:
    probs = peaky_posteriors(3000, seed=int(settings.average_window_ms))
    times_ms = 100.0 * np.arange(1, len(probs) + 1)
    recognizer = settings.recognizer(LABELS)
    expected = [recognizer.process(t, p) for t, p in zip(times_ms, probs, strict=True)]
    expected = [(d.time_s, d.keyword, d.score) for d in expected if d is not None]
    smoothed = smooth(times_ms, probs, settings.average_window_ms, settings.minimum_count)
    got = decide(
        smoothed, LABELS, settings.detection_threshold, settings.suppression_ms, settings.keyword_thresholds
    )
    assert len(expected) > 15  # the sequence exercises the logic
    assert list(got.itertuples(index=False, name=None)) == expected


# ---- scoring against a ground truth with known answers --------------------------------------------------

TRUTH = pd.DataFrame(
    {
        "start": [1.0, 4.0, 6.0, 8.0, 12.0],
        "end": [1.5, 4.4, 6.5, 8.5, 12.5],
        "word": ["yes", "no", "dog", "yes", "up"],
        "label": ["yes", "no", "unknown", "yes", "up"],
    }
)


def test_hits_late_wrong_word_duplicates_and_false_alarms_by_hand() -> None:
    detections = pd.DataFrame(
        [
            (1.9, "yes", 0.9),  # hit, 0.4 s after the end of "yes"
            (5.3, "no", 0.9),  # 0.9 s after "no" ends: too late, a false alarm ("no" is missed)
            (6.3, "go", 0.9),  # during an unknown word: a false alarm
            (8.3, "up", 0.9),  # wrong word during "yes": a false alarm
            (8.6, "yes", 0.9),  # hit (the second "yes"), 0.1 s after its end
            (8.9, "yes", 0.9),  # "yes" already hit: a false alarm
            (7.95, "yes", 0.9),  # before "yes" starts: a false alarm
            (13.25, "up", 0.9),  # exactly 0.75 s after "up" ends: a hit
        ],
        columns=["time_s", "keyword", "score"],
    ).sort_values("time_s")
    matched = match(detections, TRUTH)
    assert matched.set_index("time_s")["hit"].to_dict() == {
        1.9: 0, 5.3: -1, 6.3: -1, 7.95: -1, 8.3: -1, 8.6: 3, 8.9: -1, 13.25: 4
    }  # fmt: skip
    np.testing.assert_allclose(matched.loc[matched["hit"] >= 0, "latency_s"], [0.4, 0.1, 0.75])
    counts = count(matched, TRUTH, ["yes", "no", "up", "go"], hours=0.5)
    assert counts.positives.tolist() == [2, 1, 1, 0]
    assert counts.hits.tolist() == [2, 0, 1, 0]
    assert counts.false_alarms.tolist() == [2, 1, 1, 1]
    curve = curve_of([(0.5, counts)])
    assert curve.loc[0, "miss_rate"] == pytest.approx(1 / 4)  # "no" missed out of 4 keywords
    assert curve.loc[0, "fa_per_hour"] == pytest.approx(5 / 0.5)
    assert curve_of([(0.5, counts)], keyword=1).loc[0, "miss_rate"] == 1.0  # "no"
    assert pd.isna(curve_of([(0.5, counts)], keyword=3).loc[0, "miss_rate"])  # "go": no positives


def test_miss_rate_at_a_false_alarm_rate_and_the_det_area() -> None:
    curve = pd.DataFrame(
        {
            "threshold": [0.5, 0.9, 0.95, 1.0],
            "miss_rate": [0.2, 0.4, 0.4, 1.0],
            "fa_per_hour": [3, 0.8, 0.8, 0],
        }
    )
    assert miss_at(curve, 5.0) == (0.2, 0.5)
    assert miss_at(curve, 1.0) == (0.4, 0.95)  # equal miss rates: the higher threshold
    assert miss_at(curve, 0.5) == (1.0, 1.0)
    assert miss_at(curve[curve["fa_per_hour"] > 0], 0.5)[0] == 1.0  # no threshold gets there
    # Over FA/h log-uniform in [0.1, 10] (101 points): 46 below 0.8 (miss 1), 28 in [0.8, 3) (0.4), 27 from 3.
    assert det_auc(curve) == pytest.approx((46 * 1.0 + 28 * 0.4 + 27 * 0.2) / 101)


def test_keyword_peaks_and_the_miss_floor_by_hand() -> None:
    times_ms = np.arange(0, 14000, 100, dtype=np.float64)
    probs = np.full((len(times_ms), len(LABELS)), 0.02)
    probs[:, 1] = 0.9  # unknown everywhere, except where set below

    def at(t_s: float, label: str, value: float) -> None:
        probs[int(round(t_s * 10)), LABELS.index(label)] = value

    at(1.6, "yes", 0.95)  # first "yes" (1.0-1.5): peak 0.95
    at(2.4, "yes", 0.99)  # 0.15 s after the 0.75 s hit span: never averaged into it
    at(3.6, "no", 0.99)  # "no" (4.0-4.4): 0.4 s before its start, outside a 300 ms average
    at(3.8, "no", 0.7)  # 0.2 s before: inside a 300 ms average -> its peak 0.7
    at(8.2, "yes", 0.55)  # second "yes": 0.55
    at(12.1, "go", 0.99)  # the wrong keyword during "up": "up" peaks at the background 0.02
    peaks = keyword_peaks(times_ms, probs, TRUTH, LABELS, average_window_ms=300)
    np.testing.assert_allclose(peaks, [0.95, 0.7, 0.55, 0.02])  # yes, no, yes, up ("dog" is unknown)
    assert miss_floor(peaks, [0.5, 0.6, 0.9, 0.95]) == {"0.5": 0.25, "0.6": 0.5, "0.9": 0.75, "0.95": 1.0}
    # The floor is a floor: at any threshold no detection rule hits more than the peaks allow.
    for threshold in (0.5, 0.6, 0.9):
        smoothed = smooth(times_ms, probs, 300, 1)
        matched = match(decide(smoothed, LABELS, threshold, 0), TRUTH)
        hits = int((matched["hit"] >= 0).sum())
        assert hits <= int((peaks > threshold).sum())


# ---- stream building ------------------------------------------------------------------------------------


def toy_pool(seed: int = 0) -> ClipPool:
    """Clips of a tone burst (speech) between quiet edges, words of keywords and unknown, two noises."""
    rng = np.random.default_rng(seed)
    clips, words = [], []
    for k, word in enumerate(["yes", "no", "dog", "yes", "cat", "no", "up", "yes"]):
        length = int(rng.integers(12000, SAMPLE_RATE + 1))
        clip = (rng.normal(0, 30, length)).astype(np.float64)
        onset = int(rng.integers(1000, 5000))
        t = np.arange(5000) / SAMPLE_RATE
        clip[onset : onset + 5000] += (1000 + 500 * k) * np.sin(2 * np.pi * 440 * t)
        clips.append(np.clip(clip, -32768, 32767).astype(np.int16))
        words.append(word)
    noise = [rng.normal(0, 1, 3 * SAMPLE_RATE), np.sin(np.arange(2 * SAMPLE_RATE) * 0.05) * np.sqrt(2)]
    return ClipPool(
        clips, words, [f"{w}/{i}.wav" for i, w in enumerate(words)], ["yes", "no", "up"], noise, "toy"
    )


def test_streams_are_deterministic_for_a_seed_and_share_events_across_snrs() -> None:
    pool = toy_pool()
    recipe = StreamRecipe(duration_s=60, seed=3)
    first, again = build_stream(pool, recipe, 10.0), build_stream(pool, recipe, 10.0)
    np.testing.assert_array_equal(first.audio, again.audio)
    pd.testing.assert_frame_equal(first.truth, again.truth)
    other_seed = build_stream(pool, StreamRecipe(duration_s=60, seed=4), 10.0)
    assert not first.truth[["start", "word"]].equals(other_seed.truth[["start", "word"]])

    louder = build_stream(pool, recipe, 0.0)
    pd.testing.assert_frame_equal(first.truth, louder.truth)  # same events at every SNR
    assert louder.noise_rms / first.noise_rms == pytest.approx(10 ** (10 / 20))
    assert len(first.audio) == 60 * SAMPLE_RATE

    truth = first.truth
    gaps = truth["clip_start"].to_numpy()[1:] - truth["clip_end"].to_numpy()[:-1]
    assert gaps.min() >= 0.5 - 1e-3 and gaps.max() <= 1.5 + 1e-3
    assert (truth["start"] >= truth["clip_start"]).all() and (truth["end"] <= truth["clip_end"]).all()
    assert {"silence", "unknown", "yes", "no", "up"} >= set(truth["label"]) >= {"yes", "unknown"}
    # The tone (the "speech") spans 5000 samples of its clip: the extent found is that burst, to the
    # 10 ms frames it touches.
    spoken = truth[truth["word"] != "_silence_"]
    extent = (spoken["end"] - spoken["start"]).to_numpy()
    assert (extent >= 5000 / SAMPLE_RATE - 1e-9).all() and (extent <= 5000 / SAMPLE_RATE + 0.02 + 1e-9).all()
    # The stream is the noise track plus each clip at its place (to int16 rounding).
    noise = noise_track(pool, len(first.audio), recipe.seed) * first.noise_rms
    row = spoken.iloc[0]
    at = int(round(row["clip_start"] * SAMPLE_RATE))
    clip = pool.clips[pool.files.index(row["file"])]
    expected = noise[at : at + len(clip)] + clip / 32768.0
    np.testing.assert_allclose(first.audio[at : at + len(clip)] / 32768.0, expected, atol=1.5 / 32768)


def test_training_clips_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never training"):
        load_pool(tmp_path, ["yes"], "training")


# ---- detector settings stored in a checkpoint ------------------------------------------------------------


def test_stored_settings_are_checked_and_command_line_values_win(
    tiny_checkpoint: dict, tmp_path: Path
) -> None:
    labels = torch.load(tiny_checkpoint["ckpt"], weights_only=True)["hyper_parameters"]["labels"]
    keyword = labels[2]
    tuned = DetectorSettings(750, 0.9, 1000, 3, keyword_thresholds={keyword: 0.95})
    path = store_settings(tiny_checkpoint["ckpt"], tmp_path / "tuned.ckpt", tuned, {"split": "validation"})
    stored = torch.load(path, weights_only=True)["hyper_parameters"]["detector"]  # plain data only
    assert stored["tuned_on"] == {"split": "validation"} and stored["keyword_thresholds"] == {keyword: 0.95}

    nothing = {"average_window_ms": None, "detection_threshold": None, "suppression_ms": None}
    settings, source = resolve_settings(nothing, [str(path)], labels)
    assert settings == tuned and source.startswith("tuned")
    settings, source = resolve_settings({**nothing, "suppression_ms": 250}, [str(path)], labels)
    assert settings.suppression_ms == 250 and settings.keyword_thresholds == {keyword: 0.95}
    settings, _ = resolve_settings({**nothing, "detection_threshold": 0.5}, [str(path)], labels)
    assert settings.detection_threshold == 0.5 and settings.keyword_thresholds == {}  # one threshold asked
    assert resolve_settings(nothing, [str(tiny_checkpoint["ckpt"])], labels)[0] == DetectorSettings()
    assert resolve_settings(nothing, [str(path), str(path)], labels)[0] == DetectorSettings()  # ensemble

    for bad, why in [
        ({"detection_threshold": "0.5"}, "not a finite number"),
        ({"average_window_ms": float("nan")}, "not a finite number"),
        ({"loop": 1}, "unknown settings"),
        ({"keyword_thresholds": {"marvin": 0.5}}, "does not have"),
        ({"keyword_thresholds": {keyword: 2.0}}, r"not a number in \[0, 1\]"),
        ({"minimum_count": 0}, "minimum_count >= 1"),
        ([0.5], "not a mapping"),
    ]:
        with pytest.raises(CheckpointError, match=f"some.ckpt.*{why}"):
            parse_settings(bad, "some.ckpt", labels)


def test_a_detector_file_gives_an_ensemble_its_tuned_settings(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    """An ensemble's members cannot hold settings tuned for their average: `detector_file=` reads the
    detector.json `stream_eval tune=true` writes (checked as stored settings are) for listen / serve /
    stream_eval; command-line values still win, and it wins over a checkpoint's stored settings."""
    ckpt = str(tiny_checkpoint["ckpt"])
    labels = torch.load(ckpt, weights_only=True)["hyper_parameters"]["labels"]
    tuned = DetectorSettings(300, 0.93, 250, 2, keyword_thresholds={labels[3]: 0.97})
    detector = tmp_path / "detector.json"
    detector.write_text(json.dumps({**tuned.to_dict(), "tuned_on": {"split": "validation"}}))
    nothing = {"average_window_ms": None, "detection_threshold": None, "detector_file": str(detector)}
    settings, source = resolve_settings(nothing, [ckpt, ckpt], labels)
    assert settings == tuned and source == f"detector file {detector}"
    settings, _ = resolve_settings({**nothing, "average_window_ms": 900}, [ckpt, ckpt], labels)
    assert settings.average_window_ms == 900 and settings.detection_threshold == 0.93
    stored = store_settings(ckpt, tmp_path / "tuned.ckpt", DetectorSettings(750), {"split": "validation"})
    assert resolve_settings(nothing, [str(stored)], labels)[0] == tuned

    for content, error, why in [
        (None, ValueError, "no such file"),
        ("{not json", ValueError, "not JSON"),
        ('{"loop": 1}', CheckpointError, "unknown settings"),
    ]:
        bad = tmp_path / "bad.json"
        bad.unlink(missing_ok=True)
        if content is not None:
            bad.write_text(content)
        with pytest.raises(error, match=why):
            resolve_settings({**nothing, "detector_file": str(bad)}, [ckpt], labels)

    testing = (tiny_checkpoint["data_root"] / "testing_list.txt").read_text().split()
    import soundfile as sf

    from kws_lightning.data.audio_io import read_audio_int16

    long_wav = tmp_path / "long.wav"
    clips = [read_audio_int16(tiny_checkpoint["data_root"] / rel) for rel in testing[:4]]
    sf.write(long_wav, np.concatenate(clips), 16000)
    result = run_cli(
        "listen",
        f"ckpt_path=[{ckpt},{ckpt}]",
        f"input={long_wav}",
        f"detector_file={detector}",
        "threads=1",
        f"hydra.run.dir={tmp_path / 'listen'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (tmp_path / "listen" / "listen.log").read_text()
    assert f"detector file {detector}" in log_text and "'average_window_ms': 300.0" in log_text


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_models_carry_the_tuned_settings(tiny_checkpoint: dict, tmp_path: Path, fmt: str) -> None:
    """export copies a checkpoint's tuned settings into the file; listen/serve read them with model_path=."""
    from kws_lightning.export import export_checkpoint
    from kws_lightning.inference import Predictor
    from kws_lightning.stream_bench.settings import predictor_settings

    labels = torch.load(tiny_checkpoint["ckpt"], weights_only=True)["hyper_parameters"]["labels"]
    tuned = DetectorSettings(300, 0.85, 250, 2, keyword_thresholds={labels[3]: 0.9})
    path = store_settings(tiny_checkpoint["ckpt"], tmp_path / "tuned.ckpt", tuned, {"split": "validation"})
    suffix = ".pt" if fmt == "torchscript" else ".onnx"
    nothing = {"average_window_ms": None, "detection_threshold": None, "suppression_ms": None}
    for ckpt, expected, origin in [
        (path, tuned, "tuned settings stored in the exported model"),
        (tiny_checkpoint["ckpt"], DetectorSettings(), "defaults"),
    ]:
        out = tmp_path / f"{Path(ckpt).stem}{suffix}"
        export_checkpoint(str(ckpt), fmt, out, verify_clips=2)
        predictor = Predictor.from_exported(out, trust_code=True)
        settings, source = predictor_settings(nothing, predictor)
        assert settings == expected and source == origin
    settings, source = predictor_settings(
        {**nothing, "detection_threshold": 0.5},
        Predictor.from_exported(tmp_path / f"tuned{suffix}", trust_code=True),
    )
    assert settings.detection_threshold == 0.5 and settings.keyword_thresholds == {}
    assert settings.average_window_ms == 300 and "overridden" in source


def test_recognize_commands_uses_per_keyword_thresholds() -> None:
    recognizer = RecognizeCommands(LABELS, 300, 0.6, 500, 3, keyword_thresholds={"yes": 0.95})
    yes_at_90 = np.array([0.02, 0.02, 0.9, 0.02, 0.02, 0.02])
    assert all(recognizer.process(100 * (k + 1), yes_at_90) is None for k in range(10))
    found = [recognizer.process(1100 + 100 * k, np.roll(yes_at_90, 1)) for k in range(6)]  # "no" at 0.9
    assert [d.keyword for d in found if d] == ["no"]


# ---- eval's clip-level DET -------------------------------------------------------------------------------


def test_one_vs_rest_curve_by_hand() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.6, 0.3])
    positive = np.array([True, False, True, False, True])
    curve = one_vs_rest(scores, positive)
    assert curve["threshold"].tolist() == [np.inf, 0.9, 0.8, 0.6, 0.3]  # the tie at 0.8 is one point
    np.testing.assert_allclose(curve["miss_rate"], [1, 2 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(curve["false_alarm_rate"], [0, 0, 0.5, 1, 1])
    # ROC area = P(positive scores above a negative), ties half: (2 + 1.5 + 2 * 0 ... ) pairs by hand:
    # positives 0.9, 0.8, 0.3 vs negatives 0.8, 0.6: 0.9 beats both (2), 0.8 ties one and beats one (1.5),
    # 0.3 beats none: 3.5 of 6.
    assert roc_auc(curve) == pytest.approx(3.5 / 6)


def test_eval_writes_the_clip_det_beside_the_confusion_matrix(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    run_dir = tmp_path / "eval"
    result = run_cli(
        "eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"data_root={tiny_checkpoint['data_root']}",
        f"paths.cache_dir={tiny_checkpoint['cache_dir']}",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "confusion_matrix.png").is_file()
    assert (run_dir / "det_clips.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = pd.read_csv(run_dir / "det_clips.csv")
    summary = json.loads((run_dir / "det_clips.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["clip_det"] == summary
    assert set(points["keyword"]) == set(summary) == set(metrics["labels"][2:])
    for keyword, curve in points.groupby("keyword"):
        assert (
            curve["miss_rate"].is_monotonic_decreasing and curve["false_alarm_rate"].is_monotonic_increasing
        )
        assert summary[keyword]["roc_auc"] == pytest.approx(roc_auc(curve), abs=1e-5)
    # A model above chance (test accuracy ~0.4 of 12 classes) ranks keywords' clips above the others.
    assert np.mean([row["roc_auc"] for row in summary.values()]) > 0.6


# ---- stream_eval end to end -----------------------------------------------------------------------------


def recount(detections: pd.DataFrame, streams: Path, snr: float) -> tuple[int, int, int]:
    """(keywords, hits, false alarms) of one stream, from the written CSVs alone (an independent count)."""
    truth = pd.read_csv(streams / f"stream_snr{snr:g}db.csv")
    keywords = truth[truth["label"].isin(["silence", "unknown"]) == False]  # noqa: E712
    mine = detections[detections["snr_db"] == snr]
    hits = mine[mine["hit"] >= 0]
    for _, row in hits.iterrows():  # each hit is the right word, inside its window
        target = truth.iloc[int(row["hit"])]
        assert target["word"] == row["keyword"] and target["start"] <= row["time_s"] <= target["end"] + 0.75
    assert hits["hit"].is_unique
    return len(keywords), len(hits), len(mine) - len(hits)


def test_stream_eval_end_to_end_then_tune_and_listen_uses_the_tuned_settings(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    common = [f"data_root={tiny_checkpoint['data_root']}", "duration_min=1", "threads=1"]
    run_dir = tmp_path / "bench"
    result = run_cli(
        "stream_eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        *common,
        "snr_db=[20,0]",
        "detection_threshold=0.2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "stream_metrics.json").read_text())
    assert set(metrics["results"]) == {"20 dB", "0 dB", "all"}
    assert (run_dir / "det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    detections = pd.read_csv(run_dir / "detections.csv")
    total = [0, 0, 0]
    for snr in (20.0, 0.0):
        figures = metrics["results"][f"{snr:g} dB"]["at_settings"]
        positives, hits, alarms = recount(detections, run_dir / "streams", snr)
        assert (figures["positives"], figures["hits"], figures["false_alarms"]) == (positives, hits, alarms)
        assert figures["fa_per_hour"] == pytest.approx(alarms / (1 / 60), abs=1e-3)
        total = [a + b for a, b in zip(total, (positives, hits, alarms), strict=True)]
        sweep = metrics["results"][f"{snr:g} dB"]["sweep"]
        assert set(sweep["miss_rate_at_fa_per_hour"]) == {"0.5", "1", "2"}
        det = pd.DataFrame(metrics["results"][f"{snr:g} dB"]["det"])
        assert det["false_alarms"].is_monotonic_decreasing  # a higher threshold never adds false alarms
        assert det["threshold"].max() == 1.0 and det["false_alarms"].iloc[-1] == 0
        floor = metrics["results"][f"{snr:g} dB"]["miss_floor"]
        assert set(floor) == {"0.5", "0.9"}  # the detector's own 0.2 is below 0.5: not a floor there
        for threshold, share in floor.items():  # no threshold of the sweep misses fewer than its floor
            at_threshold = det.loc[np.isclose(det["threshold"], float(threshold)), "miss_rate"]
            assert at_threshold.iloc[0] >= share - 1e-9
    everything = metrics["results"]["all"]["at_settings"]
    assert [everything["positives"], everything["hits"], everything["false_alarms"]] == total
    # Keywords were placed, and the detector said something (the tiny model, ~0.3 accuracy on clean clips,
    # seldom names the right word in a stream: its hits are not the point here, the books are).
    assert total[0] > 10 and total[1] + total[2] > 0

    # Tune on validation streams (a small grid), then listen picks the tuned copy's settings up.
    tune_dir = tmp_path / "tune"
    result = run_cli(
        "stream_eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        *common,
        "snr_db=[10]",
        "split=validation",
        "tune=true",
        "tune_options.average_window_ms=[300,750]",
        "tune_options.suppression_ms=[500]",
        f"hydra.run.dir={tune_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = json.loads((tune_dir / "detector.json").read_text())
    assert chosen["average_window_ms"] in (300, 750) and chosen["tuned_on"]["split"] == "validation"
    tuned_ckpt = Path(json.loads((tune_dir / "stream_metrics.json").read_text())["tuned_checkpoint"])
    assert torch.load(tuned_ckpt, weights_only=True)["hyper_parameters"]["detector"] == chosen

    result = run_cli(
        "listen",
        f"ckpt_path={tuned_ckpt}",
        f"input={tune_dir / 'streams' / 'stream_snr10db.wav'}",
        f"out={tmp_path / 'heard.csv'}",
        "threads=1",
        f"hydra.run.dir={tmp_path / 'listen'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (tmp_path / "listen" / "listen.log").read_text()
    assert "tuned settings stored in the checkpoint" in log_text
    assert re.search(rf"'average_window_ms': {chosen['average_window_ms']}", log_text)
    # listen's detections on that stream are the tuning run's own at the chosen settings.
    heard = pd.read_csv(tmp_path / "heard.csv")
    own = pd.read_csv(tune_dir / "detections.csv")
    assert heard["time_s"].tolist() == own["time_s"].tolist()
    assert heard["keyword"].tolist() == own["keyword"].tolist()

    # Re-scoring the same streams with the tuned copy (same weights) reuses the cached posteriors, and
    # stream_eval too uses the stored settings by default.
    rerun = tmp_path / "rerun"
    result = run_cli(
        "stream_eval",
        f"ckpt_path={tuned_ckpt}",
        f"streams_dir={tune_dir / 'streams'}",
        "split=validation",
        f"hydra.run.dir={rerun}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "posteriors of this model read from" in (rerun / "stream_eval.log").read_text()
    again = json.loads((rerun / "stream_metrics.json").read_text())
    tuned = json.loads((tune_dir / "stream_metrics.json").read_text())
    assert again["settings"]["source"] == "tuned settings stored in the checkpoint"
    assert again["results"]["all"]["at_settings"] == tuned["results"]["all"]["at_settings"]

    with_test_split = run_cli(
        "stream_eval", f"ckpt_path={tiny_checkpoint['ckpt']}", *common, "tune=true", cwd=tmp_path
    )
    assert with_test_split.returncode == 2 and "split=validation" in with_test_split.stderr
