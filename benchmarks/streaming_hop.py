"""Compute per 100 ms hop of `listen`: the window path (the whole 1 s window) vs the incremental path
(kws_lightning/streaming_state.py), one window at a time on one thread.

Prints one figure per line (``name value unit``): median ms per hop for each path and their ratio, the
share of STFT frames computed, and the network's multiply-adds per hop (convolutions, counted from the
outputs each layer computed) for each path. Models are randomly initialised (compute does not depend on
the weights) unless --ckpt is given; the stream is 20 s of noise of changing level with tones.

    python benchmarks/streaming_hop.py [--ckpt CKPT] [--seconds 20] [--hop-ms 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from kws_lightning.features import MFCC, LogMel
from kws_lightning.inference import Predictor
from kws_lightning.models import build_model
from kws_lightning.models.kws_model import KWSModel
from kws_lightning.streaming_state import IncrementalScorer

MODELS = {
    "tc_resnet14": (MFCC, "tc_resnet14", {}),
    "tc_resnet14-1.5": (MFCC, "tc_resnet14", {"width_multiplier": 1.5}),
    "bc_resnet1": (LogMel, "bc_resnet", {}),
    "bc_resnet3": (LogMel, "bc_resnet", {"scale": 3.0}),
    "ds_cnn_s": (MFCC, "ds_cnn", {}),
}


def noise_stream(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    gain = np.repeat(10 ** rng.uniform(-2.5, -1, n // 8000 + 1), 8000)[:n]
    x = rng.standard_normal(n) * gain + 0.2 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
    return np.clip(x, -1, 1).astype(np.float32)


def conv_macs_per_output(
    net: nn.Module, features: torch.Tensor, stage_modules: list[nn.Module]
) -> list[float]:
    """Multiply-adds of each stage's convolutions on one window, divided by the stage's output length."""
    macs: dict[nn.Module, float] = {}

    def hook(module: nn.Module, _: object, out: torch.Tensor) -> None:
        kernel = int(np.prod(module.kernel_size)) * module.in_channels // module.groups
        macs[module] = macs.get(module, 0.0) + out.numel() * kernel

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    with torch.inference_mode():
        net(features)
    for h in handles:
        h.remove()
    return [sum(macs.get(m, 0.0) for m in stage.modules()) for stage in stage_modules]


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def bench(name: str, kws: KWSModel, audio: np.ndarray, hop: int, clip: int) -> None:
    padded = torch.from_numpy(np.concatenate([np.zeros(clip, np.float32), audio]))
    windows = [(padded[e : e + clip], e - clip) for e in range(hop, len(audio) + 1, hop)]
    scorer = IncrementalScorer(kws, clip, hop)
    full, inc, diff = [], [], 0.0
    with torch.inference_mode():
        for window, start in windows:
            tic = time.perf_counter()
            expected = kws(window[None])
            full.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            got = scorer.logits(window, start)
            inc.append(time.perf_counter() - tic)
            diff = max(diff, float((torch.softmax(got, -1) - torch.softmax(expected, -1)).abs().max()))
    frames_full = len(windows) * scorer.frontend.num_frames
    print(f"{name}_window_path {median_ms(full):.3f} ms/hop")
    print(f"{name}_incremental {median_ms(inc):.3f} ms/hop")
    print(f"{name}_time_ratio {statistics.median(inc) / statistics.median(full):.3f} incremental/window")
    print(f"{name}_stft_frames {scorer.frontend.computed_frames / frames_full:.3f} of the window path's")
    print(f"{name}_max_posterior_diff {diff:.2e} abs")
    if scorer.net is None:
        print(f"{name}_network_reuse 0 (window path for the network)")
        return
    stages = [s.module for s in scorer.net.plan.stages]
    with torch.inference_mode():
        features = kws.frontend(windows[-1][0][None])
    per_stage = conv_macs_per_output(kws.net, features, stages)
    totals = [c + r for c, r in zip(scorer.net.computed, scorer.net.reused, strict=True)]
    window_macs = sum(per_stage) + 0.0
    done = sum(m * c / t for m, c, t in zip(per_stage, scorer.net.computed, totals, strict=True))
    print(f"{name}_network_macs_window {window_macs / 1e6:.3f} M/hop (convolutions)")
    print(f"{name}_network_macs_incremental {done / 1e6:.3f} M/hop (convolutions, mean over the stream)")
    print(f"{name}_network_macs_ratio {done / window_macs:.3f} incremental/window")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a checkpoint instead of the randomly initialised zoo")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--hop-ms", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    audio = noise_stream(args.seconds)
    hop = int(round(args.hop_ms * 16))
    if args.ckpt:
        predictor = Predictor.from_checkpoints(args.ckpt, "cpu")
        bench("checkpoint", predictor.models[0], audio, hop, predictor.clip_samples)
        return
    for name, (frontend, model, hparams) in MODELS.items():
        torch.manual_seed(0)
        kws = KWSModel(frontend(normalize="none"), build_model(model, (1, 101, 40), 12, **hparams)).eval()
        bench(name, kws, audio, hop, 16000)


if __name__ == "__main__":
    main()
