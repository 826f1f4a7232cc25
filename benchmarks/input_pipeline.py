"""Training input path throughput: ours (cached int16 → TF sampler → device augmentation → batched MFCC)
against the seed's per-clip path (librosa.load → numpy augmentation → librosa MFCC), in one run.

    python benchmarks/input_pipeline.py --root ../shared/data/speech_commands_dev

Prints one `name: value` figure per line.
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

from kws_lightning.data.datamodule import SpeechCommandsDataModule
from kws_lightning.features import MFCC

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
    with torch.no_grad():
        for epoch in range(epochs):
            warm.train_sampler.set_epoch(epoch)
            for batch in warm.train_dataloader():
                features = mfcc(warm.to_model_input(batch, train=True))
                clips += features.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "ours_cold_setup_s (index + decode + cache write)": cold_setup,
        "ours_warm_setup_s (index + cache hit)": warm_setup,
        "ours_train_input_clips_per_s": clips / elapsed,
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


def seed_path(root: str, clips: int) -> dict[str, float]:
    dm = SpeechCommandsDataModule(root=root, cache_dir=None)
    from kws_lightning.data.index import index_training_layout

    dataset = index_training_layout(root, dm.keywords)
    noises = [librosa.load(str(p), sr=SR)[0] for p in dataset.noise_files]
    dct = scipy.fft.dct(np.eye(40), type=2, norm="ortho", axis=0)
    rng = np.random.default_rng(0)
    paths = dataset.split("training")["path"].sample(clips, random_state=0).tolist()
    seed_style_clip(paths[0], noises, dct, rng)  # librosa's first call compiles/caches filters
    start = time.perf_counter()
    for path in paths:
        seed_style_clip(path, noises, dct, rng)
    return {"seed_librosa_clips_per_s": clips / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/speech_commands_dev")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed-clips", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.root).is_dir():
        raise SystemExit(f"data root {args.root} not found: pass --root PATH to a Speech Commands folder")
    print(f"torch_threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as cache_dir:
        figures = ours(args.root, cache_dir, args.batch_size, args.epochs)
    figures.update(seed_path(args.root, args.seed_clips))
    figures["speedup_x"] = figures["ours_train_input_clips_per_s"] / figures["seed_librosa_clips_per_s"]
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
