"""Front-end throughput: batched torch front ends vs the seeds' per-clip librosa / scipy loops.

Prints one ``name value unit`` figure per line. Run: ``python benchmarks/frontend_speed.py [--batch 128]``.
Clips are 1 s of noise at 16 kHz; the reference loops are what the seeds ran per clip in their data loaders.
Each rate is the best single call over a short window, which is robust to other jobs sharing the CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import librosa
import numpy as np
import scipy.fft
import scipy.signal
import torch
from bench_common import figure

from kws_lightning.features import MFCC, LogMel, LogSpectrogram


def honk_mfcc(y: np.ndarray) -> np.ndarray:
    data = librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=480, hop_length=160, n_mels=40, fmin=20, fmax=4000
    )
    data[data > 0] = np.log(data[data > 0])
    return scipy.fft.dct(data, type=2, norm="ortho", axis=0).T


def kaggle_log_spec(y: np.ndarray) -> np.ndarray:
    resampled = scipy.signal.resample(y, y.shape[0] // 2)
    _, _, spec = scipy.signal.spectrogram(
        resampled, fs=8000, window="hann", nperseg=160, noverlap=80, detrend=False
    )
    return np.log(spec.T.astype(np.float32) + 1e-10)


def clips_per_second(run: Callable[[], object], clips: int, min_seconds: float) -> float:
    """Best single-call rate over at least ``min_seconds``: robust to other jobs sharing the CPU."""
    run()  # warm-up (librosa's numba / caches, torch's FFT plans)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_seconds or best == float("inf"):
        tic = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - tic)
    return clips / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing window per figure")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    waves = np.random.default_rng(0).normal(0.0, 0.1, (args.batch, 16000)).astype(np.float32)
    batch = torch.from_numpy(waves)
    print(f"setup: {torch.get_num_threads()} torch threads")
    for name, frontend in (("mfcc", MFCC()), ("logmel", LogMel()), ("logspec", LogSpectrogram())):
        with torch.inference_mode():
            rate = clips_per_second(lambda f=frontend: f(batch), args.batch, args.seconds)
        figure(f"{name}_torch_cpu_batch{args.batch}", rate, "clips/s")
        if torch.cuda.is_available():
            gpu_frontend, gpu_batch = frontend.cuda(), batch.cuda()

            def run_gpu(f=gpu_frontend, x=gpu_batch) -> None:
                f(x)
                torch.cuda.synchronize()

            with torch.inference_mode():
                rate = clips_per_second(run_gpu, args.batch, args.seconds)
            figure(f"{name}_torch_cuda_batch{args.batch}", rate, "clips/s")

    for name, reference in (("mfcc", honk_mfcc), ("logspec", kaggle_log_spec)):
        rate = clips_per_second(lambda r=reference: [r(y) for y in waves], args.batch, args.seconds)
        figure(f"{name}_reference_per_clip_cpu", rate, "clips/s")


if __name__ == "__main__":
    main()
