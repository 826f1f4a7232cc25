"""Scale: a 65,000-clip set (Speech Commands v0.01's size) made from the dev set by perturbed copies;
wave-cache build time, cache size, one training epoch's time and peak memory.

    python benchmarks/scale_epoch.py [--clips 65000] [--model tc_resnet14] [--threads 2]   # make bench-scale

The set is written once under logs/bench_cache/scale_<clips>/ (each dev clip copied with a random gain,
a shift of up to 100 ms and a little noise; every copy gets its own speaker id, so the speaker-hash
split spreads copies over training / validation / testing) and reused by later runs. The cache is
built into a fresh folder every run (the build time is the figure). The epoch (training split only,
the recipe's batch size, real input path, no validation) runs in a child process so its peak RSS is
that of training alone: a memory-mapped cache counts in RSS as its pages are read, so the target is
peak RSS < 1.3 x cache size + a fixed allowance for Python, torch, the model and the batches
(--allowance-mb, 700 MB: a 2-thread torch process with a small model and its batches uses 500-600 MB
before reading any data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from bench_common import BENCH_CACHE, DEV_DATA, figure, recipe_model, set_threads, training_step_fn

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.data.index import index_training_layout


def make_scale_set(dev_root: str, clips: int) -> Path:
    """`clips` perturbed copies of the dev set's word clips, in its layout; written on first use only."""
    root = BENCH_CACHE / f"scale_{clips}"
    done = root / "COMPLETE"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    dataset = index_training_layout(dev_root)
    sources = dataset.clips.sort_values("rel")
    rng = np.random.default_rng(0)
    (root / "_background_noise_").mkdir(parents=True)
    for noise in dataset.noise_files:
        shutil.copy(noise, root / "_background_noise_" / Path(noise).name)
    paths, words = sources["path"].tolist(), [Path(r).parent.name for r in sources["rel"]]
    for k in range(clips):
        source = k % len(paths)
        wave = read_audio_int16(paths[source], 16000).astype(np.float32)
        wave = np.roll(wave * rng.uniform(0.5, 1.5), int(rng.integers(-1600, 1601)))
        wave += rng.normal(0, 30, wave.shape)
        folder = root / words[source]
        folder.mkdir(exist_ok=True)
        speaker = f"{k // len(paths):02d}{Path(paths[source]).name.split('_nohash_')[0]}"
        sf.write(folder / f"{speaker}_nohash_{k}.wav", np.clip(wave, -32768, 32767).astype(np.int16), 16000)
    done.write_text("written by benchmarks/scale_epoch.py\n")
    figure("scale_set_write_s", time.perf_counter() - started, "s")
    return root


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB. Not getrusage's ru_maxrss: a child
    started by fork + exec inherits its parent's peak there (Linux keeps it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"/proc/self/status has no {field}: peak RSS is measured on Linux only")


def epoch_child(root: str, cache_dir: str, model_name: str, threads: int) -> None:
    """One training epoch on the built cache; prints JSON {epoch_s, items, base_rss_mb, peak_rss_mb}."""
    from hydra.utils import instantiate

    set_threads(threads)
    model, cfg = recipe_model(model_name)
    cfg.data.root, cfg.data.cache_dir, cfg.data.verify_cache = root, cache_dir, "off"
    step = training_step_fn(cfg, model)
    base = rss_mb("VmRSS")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    items, started = 0, time.perf_counter()
    for batch in datamodule.train_dataloader():
        step(datamodule.to_model_input(batch, train=True), batch["targets"])
        items += len(batch["targets"])
    seconds = time.perf_counter() - started
    peak = rss_mb("VmHWM")
    print(json.dumps({"epoch_s": seconds, "items": items, "base_rss_mb": base, "peak_rss_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEV_DATA)
    parser.add_argument("--clips", type=int, default=65000)
    parser.add_argument("--model", default="tc_resnet14")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allowance-mb", type=float, default=700.0)
    parser.add_argument("--epoch-child", nargs=2, metavar=("ROOT", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch_child:
        epoch_child(*args.epoch_child, args.model, args.threads)
        return
    if not Path(args.root).is_dir():
        raise SystemExit(f"data root {args.root} not found: pass --root PATH (or set KWS_DEV_DATA)")
    set_threads(args.threads)
    root = make_scale_set(args.root, args.clips)
    from kws_lightning.data.datamodule import SpeechCommandsDataModule

    with tempfile.TemporaryDirectory(dir=BENCH_CACHE) as cache_dir:
        started = time.perf_counter()
        datamodule = SpeechCommandsDataModule(root=str(root), cache_dir=cache_dir)
        datamodule.setup("fit")
        figure("scale_cache_build_s", time.perf_counter() - started, "s")
        cache_mb = datamodule.cache.samples.nbytes / 2**20
        figure("scale_cache_mb", cache_mb, "MiB")
        figure("scale_cache_build_peak_rss_mb", rss_mb("VmHWM"), "MiB")
        print(f"scale set: {len(datamodule.cache)} clips; {datamodule.describe()}")
        del datamodule
        child = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads)]
            + ["--epoch-child", str(root), cache_dir],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise SystemExit(f"the epoch child failed:\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
    limit = 1.3 * cache_mb + args.allowance_mb
    print(f"epoch: {result['items']} items of {args.model}; RSS before data {result['base_rss_mb']:.0f} MiB")
    figure("scale_epoch_s", result["epoch_s"], "s")
    figure("scale_peak_rss_mb", result["peak_rss_mb"], "MiB")
    figure("scale_rss_limit_mb", limit, "MiB")
    figure("scale_peak_rss_vs_limit", result["peak_rss_mb"] / limit, "fraction")


if __name__ == "__main__":
    main()
