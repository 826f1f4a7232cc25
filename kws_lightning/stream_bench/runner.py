"""The plumbing of `python -m kws_lightning.stream_eval`: get the streams (build them from a split, or read
ones written before), compute each stream's posteriors once, optionally tune the detector on them, then
score the sweep and the chosen setting, and write stream_metrics.json, det.png and detections.csv."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from kws_lightning.stream_bench.scoring import (
    FA_POINTS,
    FLOOR_THRESHOLDS,
    curve_of,
    keyword_peaks,
    miss_floor,
    operating_point,
    summarize,
)
from kws_lightning.stream_bench.streams import (
    SAMPLE_RATE,
    StreamRecipe,
    build_stream,
    load_pool,
    read_streams,
    write_manifest,
    write_stream,
)
from kws_lightning.stream_bench.tuning import ScoredStream, counts_for, pooled, sweep, tune

log = logging.getLogger(__name__)


def data_root_of(cfg: DictConfig, predictor: Any) -> str:
    """`data_root`, else the root recorded in the checkpoint's data config."""
    root = cfg.get("data_root") or (predictor.configs[0].get("data") or {}).get("root")
    if not root or not Path(str(root)).expanduser().is_dir():
        raise ValueError(
            f"no data folder to build streams from (the checkpoint records {root!r}, not a folder from "
            f"{Path.cwd()}): pass data_root=PATH (a Speech Commands folder), or streams_dir=DIR"
        )
    return str(root)


def get_streams(cfg: DictConfig, predictor: Any, out_dir: Path) -> tuple[list[tuple[dict, Any, Any]], str]:
    """[(manifest entry, int16 audio, truth)] and a description of where they came from."""
    if cfg.get("streams_dir"):
        return read_streams(cfg.streams_dir), f"streams read from {cfg.streams_dir}"
    if predictor.sample_rate != SAMPLE_RATE:
        raise ValueError(f"streams are built at {SAMPLE_RATE} Hz; the model takes {predictor.sample_rate} Hz")
    pool = load_pool(data_root_of(cfg, predictor), predictor.keywords, cfg.split)
    gap = list(cfg.gap_s)
    recipe = StreamRecipe(
        float(cfg.duration_min) * 60.0,
        int(cfg.seed),
        float(gap[0]),
        float(gap[1]),
        cfg.p_unknown,
        cfg.p_silence,
    )
    folder = out_dir / "streams"
    streams, entries = [], []
    for snr in cfg.snr_db:
        stream = build_stream(pool, recipe, float(snr))
        entry = write_stream(stream, folder, recipe, pool.description)
        entries.append(entry)
        streams.append((entry, stream.audio, stream.truth))
    write_manifest(entries, folder)
    return streams, f"{pool.description}; written to {folder}"


def score_streams(
    cfg: DictConfig, predictor: Any, streams: list[tuple[dict, Any, Any]], folder: Path, own: bool
) -> list[ScoredStream]:
    """Posteriors of every stream: from the cache beside it when this model wrote one, else computed (and
    cached when the streams are this run's own, `own`)."""
    from kws_lightning.stream_bench import posteriors as post

    fingerprint = post.model_fingerprint(predictor, cfg.hop_ms)
    scored = []
    for entry, audio, truth in streams:
        hours = len(audio) / SAMPLE_RATE / 3600.0
        cache = post.cache_path(folder, entry["wav"])
        cached = post.load_cached(cache, fingerprint, len(predictor.labels))
        if cached is not None:
            times_ms, probs = cached
            log.info("%s: posteriors of this model read from %s", entry["wav"], cache)
        else:
            started = time.perf_counter()
            times_ms, probs = post.stream_posteriors(predictor, audio, cfg.hop_ms, cfg.batch_size)
            seconds = time.perf_counter() - started
            log.info("%s: %d windows in %.1f s (real-time factor %.4f)", entry["wav"], len(times_ms),
                     seconds, seconds / (hours * 3600.0))  # fmt: skip
            if own:
                post.save_cached(cache, fingerprint, times_ms, probs)
        scored.append(ScoredStream(str(entry["snr_db"]), times_ms, probs, truth, hours))
    return scored


def label_of(snr: str) -> str:
    return f"{float(snr):g} dB"


def evaluate_streams(
    cfg: DictConfig, predictor: Any, scored: list[ScoredStream], settings: Any
) -> tuple[dict, pd.DataFrame]:
    """Figures per stream and pooled, and the chosen setting's detections (all streams)."""
    labels = predictor.labels
    sweeps, results, detections, total, all_peaks = {}, {}, [], None, []
    floor_at = sorted({*FLOOR_THRESHOLDS, max(0.5, float(settings.detection_threshold))})
    for stream in scored:
        one = sweep(stream, labels, settings)
        sweeps[stream.name] = one
        counts, matched = counts_for(stream, labels, settings)
        total = counts if total is None else total + counts
        peaks = keyword_peaks(stream.times_ms, stream.probs, stream.truth, labels, settings.average_window_ms)
        all_peaks.append(peaks)
        results[label_of(stream.name)] = {
            "sweep": summarize(one),
            "at_settings": operating_point(counts),
            "miss_floor": miss_floor(peaks, floor_at),
            "det": curve_of(one).to_dict(orient="records"),
        }
        truth_words = stream.truth["word"].to_numpy()
        matched = matched.assign(
            snr_db=float(stream.name),
            true_word=[truth_words[h] if h >= 0 else "" for h in matched["hit"]],
        )
        detections.append(matched)
    all_sweep = pooled(list(sweeps.values()))
    results["all"] = {
        "sweep": summarize(all_sweep),
        "at_settings": operating_point(total),
        "miss_floor": miss_floor(np.concatenate(all_peaks) if all_peaks else np.zeros(0), floor_at),
    }
    frame = pd.concat(detections) if detections else pd.DataFrame()
    if not frame.empty:
        frame = frame[["snr_db", "time_s", "keyword", "score", "hit", "true_word", "latency_s"]]
    return results, frame


def print_table(results: dict) -> None:
    heads = " ".join(f"miss@{p:g}FA/h" for p in FA_POINTS)
    print(f"{'SNR':>8} {heads}  DET-AUC  latency med/p90 s | at settings: miss  FA/h")
    for name, result in results.items():
        s, a = result["sweep"], result["at_settings"]
        misses = " ".join(f"{s['miss_rate_at_fa_per_hour'][f'{p:g}']:>11.4f}" for p in FA_POINTS)
        latency = f"{s['latency_median_s']}/{s['latency_p90_s']}"
        print(f"{name:>8} {misses}  {s['det_auc']:.4f}  {latency:>15} | {a['miss_rate']}  {a['fa_per_hour']}")
    floors = {name: result["miss_floor"] for name, result in results.items() if "miss_floor" in result}
    if floors:
        print("miss floor (keywords the network never scores above t: no detector setting finds them):")
        for name, floor in floors.items():
            print(f"{name:>8} " + "  ".join(f"t={t}: {share}" for t, share in floor.items()))


def run(cfg: DictConfig) -> dict:
    import torch

    from kws_lightning.inference import Predictor, checkpoint_paths
    from kws_lightning.stream_bench.plots import plot_stream_det
    from kws_lightning.stream_bench.settings import resolve_settings, store_settings

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.tune and cfg.split != "validation" and not cfg.get("streams_dir"):
        raise ValueError(
            "tune=true chooses settings on validation streams: add split=validation (never test)"
        )
    predictor = Predictor.from_checkpoints(checkpoint_paths(cfg.ckpt_path), cfg.device)
    settings, source = resolve_settings(cfg, predictor.paths, predictor.labels)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    streams, description = get_streams(cfg, predictor, out_dir)
    own = not cfg.get("streams_dir")
    folder = out_dir / "streams" if own else Path(cfg.streams_dir).expanduser()
    scored = score_streams(cfg, predictor, streams, folder, own)

    metrics: dict[str, Any] = {"checkpoints": predictor.paths, "streams": description, "split": cfg.split}
    metrics["stream_files"] = [entry for entry, _, _ in streams]
    if cfg.tune:
        options = cfg.tune_options
        settings, table = tune(
            scored,
            predictor.labels,
            list(options.average_window_ms),
            list(options.suppression_ms),
            list(options.minimum_count),
            float(options.target_fa_per_hour),
            bool(options.per_keyword),
        )
        source = f"tuned on these {cfg.split} streams"
        tuned_on = {
            "split": str(cfg.split),
            "snr_db": [float(s) for s in cfg.snr_db],
            "duration_min": float(cfg.duration_min),
            "seed": int(cfg.seed),
            "target_fa_per_hour": float(options.target_fa_per_hour),
        }
        (out_dir / "detector.json").write_text(
            json.dumps({**settings.to_dict(), "tuned_on": tuned_on}, indent=2)
        )
        pd.DataFrame([row for row in table if "per_keyword" not in row]).to_csv(
            out_dir / "tuning.csv", index=False
        )
        if len(predictor.paths) == 1:
            target = out_dir / f"{Path(predictor.paths[0]).stem}_tuned.ckpt"
            store_settings(predictor.paths[0], target, settings, tuned_on)
            metrics["tuned_checkpoint"] = str(target)
        metrics["tuning"] = table
    metrics["settings"] = {**settings.to_dict(), "source": source}
    results, detections = evaluate_streams(cfg, predictor, scored, settings)
    metrics["results"] = results
    metrics["definitions"] = {
        "hit": "a detection of the right keyword between the keyword's speech start and 0.75 s after its end",
        "miss_rate_at_fa_per_hour": "lowest miss rate of the threshold sweep with at most that many false "
        "alarms per hour (1.0 when no threshold gets there)",
        "det_auc": "mean of that miss rate over FA/h log-uniform in [0.1, 10] (lower is better)",
        "latency": "detection time minus the keyword's speech end, at the 1 FA/h operating point",
        "at_settings": "the detector as listen runs it with `settings` (no sweep)",
        "miss_floor": "share of keywords whose class posterior never exceeds t in any window the smoothed "
        "score of their hit span averages: misses no detector with this smoothing and threshold t avoids",
    }
    (out_dir / "stream_metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    detections.to_csv(out_dir / "detections.csv", index=False)
    curves = {name: pd.DataFrame(r["det"]) for name, r in results.items() if "det" in r}
    plot_stream_det(curves, out_dir / "det.png", f"{Path(predictor.paths[0]).stem}: {cfg.split} streams")

    print(f"streams: {description}")
    print(f"detector settings ({source}): {settings.to_dict()}")
    print_table(results)
    if "tuned_checkpoint" in metrics:
        print(f"tuned checkpoint (listen uses its settings): {metrics['tuned_checkpoint']}")
    elif cfg.tune:  # an ensemble: no one checkpoint holds settings tuned for the average
        detector = out_dir / "detector.json"
        print(f"tuned settings for this ensemble: pass listen / serve / stream_eval detector_file={detector}")
    print(f"run dir: {out_dir}")
    log.debug("config: %s", OmegaConf.to_yaml(cfg))
    return metrics
