"""Wave cache cost on a real folder: building it (decode + checksums) and each `verify_cache` mode on a hit.

    python benchmarks/wave_cache_verify.py --root ../shared/data/speech_commands_dev

Indexes the folder as training does, builds the cache in a temporary folder `--repeats` times (best time
kept; the source files are in the page cache after the first read), then times a hit with
``verify_cache=off|quick|full``. Prints one ``name value unit`` figure per line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_common import DEV_DATA, figure

from kws_lightning.data.index import index_training_layout
from kws_lightning.data.wave_cache import DEFAULT_MAX_CLIP_S, load_or_build


def best_of(repeats: int, run: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=DEV_DATA)
    parser.add_argument("--threads", type=int, default=2, help="data.decode_threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = list(index_training_layout(args.root).clips["path"])
    max_samples = int(DEFAULT_MAX_CLIP_S * 16000)
    print(f"setup: {len(paths)} clips")
    with tempfile.TemporaryDirectory() as tmp:
        builds = iter(range(args.repeats))

        def build() -> None:
            load_or_build(paths, Path(tmp) / f"b{next(builds)}", 16000, args.threads, max_samples)

        figure("wave_cache_build_s", best_of(args.repeats, build), "s")
        cache = load_or_build(paths, Path(tmp) / "b0", 16000, args.threads, max_samples)
        figure("wave_cache_mb", cache.samples.nbytes / 1e6, "MB")
        for mode in ("off", "quick", "full"):
            seconds = best_of(
                args.repeats,
                lambda mode=mode: load_or_build(
                    paths, Path(tmp) / "b0", 16000, args.threads, max_samples, mode
                ),
            )
            figure(f"wave_cache_hit_verify_{mode}_s", seconds, "s")


if __name__ == "__main__":
    main()
