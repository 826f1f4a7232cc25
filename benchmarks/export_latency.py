"""Exported model sizes and single-clip CPU latency (PyTorch eager, TorchScript, ONNX Runtime), and the
streaming real-time factor of `kws_lightning.listen` on one core.

Prints one ``name value unit`` figure per line. Latency is the median over `--runs` calls on one
1 s clip with one intra-op thread (torch and onnxruntime alike), after warm-up. The streaming figure
runs `StreamingDetector` (1 s window every `--hop-ms`, batches of windows) over 60 s of noise.

    python benchmarks/export_latency.py [--ckpt CKPT | --model cnn_trad_pool2 --feature mfcc]
        [--runs 200] [--threads 1] [--hop-ms 100]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_common import figure
from predict_throughput import add_model_arguments, predictor_from_args  # the sibling script

from kws_lightning.export import ExportedModel, export_onnx, export_torchscript, load_exported
from kws_lightning.listen import RecognizeCommands, StreamingDetector


def median_ms(run: Callable[[], object], runs: int) -> float:
    for _ in range(max(5, runs // 10)):
        run()
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hop-ms", type=float, default=100.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    predictor = predictor_from_args(args)
    model = predictor.models[0]
    module = ExportedModel(model).eval()
    clip = np.random.default_rng(0).normal(0, 0.1, (1, predictor.clip_samples)).astype(np.float32)
    metadata = {"labels": predictor.labels, "sample_rate": predictor.sample_rate}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    print(f"model: {type(model.frontend).__name__} + {type(model.net).__name__}, {args.threads} thread(s)")
    figure("state_dict_mb", buffer.tell() / 1e6, "MB")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(module, Path(tmp) / "m.onnx", predictor.clip_samples, metadata)
        script_path = export_torchscript(module, Path(tmp) / "m.pt", predictor.clip_samples, metadata)
        figure("onnx_file_mb", onnx_path.stat().st_size / 1e6, "MB")
        figure("torchscript_file_mb", script_path.stat().st_size / 1e6, "MB")
        onnx_run = load_exported(onnx_path, "onnx", threads=args.threads)
        script_run = load_exported(script_path, "torchscript")
        waves = torch.from_numpy(clip)

        def eager() -> object:
            with torch.inference_mode():
                return model(waves)

        def frontend_only() -> object:
            with torch.inference_mode():
                return model.frontend(waves)

        figure("pytorch_eager_latency_ms", median_ms(eager, args.runs), "ms/clip")
        figure("torchscript_latency_ms", median_ms(lambda: script_run(clip), args.runs), "ms/clip")
        figure("onnxruntime_latency_ms", median_ms(lambda: onnx_run(clip), args.runs), "ms/clip")
        figure("pytorch_frontend_only_latency_ms", median_ms(frontend_only, args.runs), "ms/clip")

    detector = StreamingDetector(predictor, RecognizeCommands(predictor.labels), args.hop_ms, batch_size=64)
    stream = np.random.default_rng(1).normal(0, 0.05, 60 * predictor.sample_rate).astype(np.float32)
    detector.feed(stream[: predictor.sample_rate])  # warm-up
    started = time.perf_counter()
    detector.feed(stream)
    rtf = (time.perf_counter() - started) / 60.0
    print(f"streaming: hop {args.hop_ms:.0f} ms, {args.threads} thread(s), windows in batches of 64")
    figure("listen_rtf_batched_export_model", rtf, "x")


if __name__ == "__main__":
    main()
