"""Float vs int8 ONNX for one checkpoint: file size, network weights and front-end constants, single-clip
latency on one CPU thread (onnxruntime), and accuracy on the checkpoint's fixed draws (as `eval` scores
them; --splits validation first, to choose quantisation settings before reading test figures). Exports both
files (`kws_lightning.export ... quantize=int8`) unless they exist.

Prints one figure per line (``name value unit``); --name prefixes them.

    python benchmarks/int8_report.py --ckpt CKPT --out DIR [--name tc_resnet14] [--runs 200]
        [--calibration-clips 400] [--data-root PATH] [--per-tensor] [--input-bits 16] [--calibration auto]
        [--activation-bits 8]
        [--splits validation testing]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from kws_lightning.eval import classification_metrics, datamodule_test_set, score
from kws_lightning.export import export_checkpoint, load_exported
from kws_lightning.inference import Predictor
from kws_lightning.quantize import CALIBRATIONS, INPUT_BITS, frontend_nodes, weight_sizes


def latency_ms(path: Path, runs: int) -> float:
    run = load_exported(path, "onnx", threads=1)
    clip = (np.random.default_rng(0).standard_normal((1, 16000)) * 0.1).astype(np.float32)
    for _ in range(max(5, runs // 10)):
        run(clip)
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        run(clip)
        times.append(time.perf_counter() - tic)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="folder for model.onnx and model.int8.onnx")
    parser.add_argument("--name", default="model")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--calibration-clips", type=int, default=400)
    parser.add_argument("--data-root", default=None, help="the checkpoint's data set, if moved")
    parser.add_argument("--cache-dir", default="logs/cache")
    parser.add_argument("--per-tensor", action="store_true", help="one int8 scale per weight tensor")
    parser.add_argument("--input-bits", type=int, default=16, choices=INPUT_BITS, help="the network's input")
    parser.add_argument("--activation-bits", type=int, default=8, choices=INPUT_BITS, help="the others")
    parser.add_argument("--calibration", default="auto", choices=CALIBRATIONS, help="activation ranges")
    parser.add_argument(
        "--splits", nargs="+", default=["testing"], choices=["validation", "testing"], help="draws to score"
    )
    args = parser.parse_args()
    out = Path(args.out)
    float_path, int8_path = out / "model.onnx", out / "model.int8.onnx"
    if not int8_path.exists():
        export_checkpoint(
            args.ckpt,
            "onnx",
            float_path,
            quantize="int8",
            calibration_clips=args.calibration_clips,
            calibration_root=args.data_root,
            per_channel=not args.per_tensor,
            input_bits=args.input_bits,
            calibration=args.calibration,
            activation_bits=args.activation_bits,
        )
    excluded = set(frontend_nodes(onnx.load(str(float_path))))
    meta = {p.key: p.value for p in onnx.load(str(int8_path)).metadata_props}
    quantization = json.loads(meta.get("quantization", "{}"))
    chosen, scores = quantization.get("calibration"), quantization.get("calibration_scores")
    print(f"{args.name}_int8_calibration {chosen} {json.dumps(scores)}")
    checkpoint = Predictor.from_checkpoints(args.ckpt, "cpu")
    accuracies: dict[tuple[str, str], float] = {}
    for kind, path, predictor in (
        ("checkpoint", None, checkpoint),
        ("float", float_path, Predictor.from_exported(float_path, threads=1)),
        ("int8", int8_path, Predictor.from_exported(int8_path, threads=1)),
    ):
        for split in args.splits:
            draw = datamodule_test_set(predictor, args.cache_dir, 64, 0, args.data_root, split=split)
            probs, targets = score(predictor, draw)
            accuracy = classification_metrics(targets, probs, predictor.labels)["accuracy"]
            accuracies[kind, split] = accuracy
            print(f"{args.name}_{kind}_{split}_accuracy {accuracy:.4f} on {len(targets)} clips")
        if path is None:
            continue
        sizes = weight_sizes(onnx.load(str(path)), excluded)
        print(f"{args.name}_{kind}_file {path.stat().st_size} bytes")
        print(f"{args.name}_{kind}_network_weights {sizes['network_bytes']} bytes")
        print(f"{args.name}_{kind}_frontend_constants {sizes['frontend_bytes']} bytes")
        print(f"{args.name}_{kind}_latency {latency_ms(path, args.runs):.3f} ms/clip (1 thread, median)")
    float_w = weight_sizes(onnx.load(str(float_path)), excluded)["network_bytes"]
    int8_w = weight_sizes(onnx.load(str(int8_path)), excluded)["network_bytes"]
    print(f"{args.name}_network_weights_ratio {float_w / int8_w:.2f} float/int8")
    for split in args.splits:
        lost = 100 * (accuracies["float", split] - accuracies["int8", split])
        print(f"{args.name}_{split}_accuracy_lost {lost:.2f} points")


if __name__ == "__main__":
    main()
