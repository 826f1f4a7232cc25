"""Training input path throughput: ours (cached int16 → TF sampler → device augmentation → batched MFCC)
against the seed's per-clip path (librosa.load → numpy augmentation → librosa MFCC), in one run.

    python benchmarks/input_pipeline.py --root ../shared/data/speech_commands_dev [--threads 2]

The seed's actual set-up is a torch `DataLoader` whose `--threads` worker processes each run that per-clip
path; ours runs in one process on `--threads` torch threads, so both use the same number of cores. The
per-clip path in one process is printed too. Figures are ``name value unit`` lines (bench_common.figure).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import scipy.fft
import torch
from bench_common import DEV_DATA, figure, set_threads  # the sibling module
from torch.utils.data import DataLoader, Dataset

from kws_lightning.data.datamodule import SpeechCommandsDataModule
from kws_lightning.features import MFCC, float32_dfts

SR = 16000


def ours(root: str, cache_dir: str, batch_size: int, epochs: int) -> dict[str, float]:
    start = time.perf_counter()
    dm = SpeechCommandsDataModule(root=root, cache_dir=cache_dir, batch_size=batch_size)
    dm.setup("fit")
    cold_setup = time.perf_counter() - start
    start = time.perf_counter()
    warm = SpeechCommandsDataModule(root=root, cache_dir=cache_dir, batch_size=batch_size)
    warm.setup("fit")
    warm_setup = time.perf_counter() - start
    mfcc = MFCC()
    clips = 0
    start = time.perf_counter()
    # The training input path: training steps run float32 DFTs (kws_lightning/module.py).
    with torch.no_grad(), float32_dfts(mfcc):
        for epoch in range(epochs):
            warm.train_sampler.set_epoch(epoch)
            for batch in warm.train_dataloader():
                features = mfcc(warm.to_model_input(batch, train=True))
                clips += features.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "input_cold_setup_s": cold_setup,  # index + decode + cache write
        "input_warm_setup_s": warm_setup,  # index + cache hit
        "input_clips_per_s_ours": clips / elapsed,
    }


def seed_style_clip(
    path: str, noises: list[np.ndarray], dct: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """What the seed did per clip: load, pad/crop, shift, noise, MFCC (honk-style), all in numpy/librosa."""
    y, _ = librosa.load(path, sr=SR)
    if len(y) < SR:
        left = rng.integers(0, SR - len(y) + 1)
        y = np.pad(y, (left, SR - len(y) - left))
    else:
        start = rng.integers(0, len(y) - SR + 1)
        y = y[start : start + SR]
    if rng.random() < 0.5:
        shift = rng.integers(-int(0.2 * SR), int(0.2 * SR) + 1)
        y = np.roll(y, shift)
        if shift > 0:
            y[:shift] = 0
        elif shift < 0:
            y[shift:] = 0
    if rng.random() < 0.5:
        noise = noises[rng.integers(len(noises))]
        start = rng.integers(0, len(noise) - SR)
        y = np.clip(y + rng.uniform(0, 0.2) * noise[start : start + SR], -1, 1)
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=480, hop_length=160, n_mels=40, fmin=20, fmax=4000)
    mel[mel > 0] = np.log(mel[mel > 0])
    return (dct @ mel).T.astype(np.float32)


class SeedClips(Dataset):
    """The seed's Dataset: one file per `__getitem__`, decoded, augmented and turned into MFCC there."""

    def __init__(self, paths: list[str], noises: list[np.ndarray]) -> None:
        self.paths, self.noises = paths, noises
        self.dct = scipy.fft.dct(np.eye(40), type=2, norm="ortho", axis=0)
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> np.ndarray:
        return seed_style_clip(self.paths[item], self.noises, self.dct, self.rng)


def _reseed(worker: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(worker + 1)


def seed_path(root: str, clips: int, workers: int, batch_size: int) -> dict[str, float]:
    dm = SpeechCommandsDataModule(root=root, cache_dir=None)
    from kws_lightning.data.index import index_training_layout

    dataset = index_training_layout(root, dm.keywords)
    noises = [librosa.load(str(p), sr=SR)[0] for p in dataset.noise_files]
    paths = dataset.split("training")["path"].sample(clips, random_state=0, replace=True).tolist()
    seed_clips = SeedClips(paths, noises)
    seed_clips[0]  # librosa's first call compiles/caches filters (inherited by forked workers)
    start = time.perf_counter()
    for item in range(len(seed_clips)):
        seed_clips[item]
    per_clip = clips / (time.perf_counter() - start)

    loader = DataLoader(
        seed_clips, batch_size=batch_size, shuffle=True, num_workers=workers, worker_init_fn=_reseed
    )
    # Each worker's first batch pays for starting that worker: timed from the moment the last of them
    # arrives, so the figure is the steady rate (counting start-up would flatter our ratio).
    batches = iter(loader)
    for _ in range(max(workers, 1)):
        next(batches)
    done = 0
    start = time.perf_counter()
    for batch in batches:
        done += len(batch)
    if done == 0:
        raise SystemExit(f"--seed-clips {clips} gives no batch after the workers' first: use more clips")
    loaded = done / (time.perf_counter() - start)
    return {"input_clips_per_s_seed_per_clip": per_clip, "input_clips_per_s_seed_dataloader": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=DEV_DATA)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed-clips", type=int, default=1000)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads for ours = worker processes for the seed's"
    )
    args = parser.parse_args()
    threads = set_threads(args.threads)
    if not Path(args.root).is_dir():
        raise SystemExit(f"data root {args.root} not found: pass --root PATH to a Speech Commands folder")
    print(f"setup: ours on {threads} torch thread(s); seed DataLoader with {args.threads} worker processes")
    with tempfile.TemporaryDirectory() as cache_dir:
        figures = ours(args.root, cache_dir, args.batch_size, args.epochs)
    figures.update(seed_path(args.root, args.seed_clips, args.threads, args.batch_size))
    for name, value in figures.items():
        figure(name, value, "s" if name.endswith("_s") else "clips/s")
    ours_rate = figures["input_clips_per_s_ours"]
    figure("input_speedup_vs_seed", ours_rate / figures["input_clips_per_s_seed_dataloader"], "x")
    figure("input_speedup_vs_seed_per_clip", ours_rate / figures["input_clips_per_s_seed_per_clip"], "x")


if __name__ == "__main__":
    main()
