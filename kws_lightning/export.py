"""`python -m kws_lightning.export ckpt_path=CKPT format=onnx|torchscript [out=...] [output=logits|probs]`.

The exported graph is the whole `KWSModel`, front end included: input ``waves`` float32 (batch,
clip_samples) at the model's sample rate (16000 x 16 kHz by default), in [-1, 1]; output ``logits`` or
``probs`` (batch, classes); the batch size is dynamic. Class names, sample rate and clip length travel
inside the file (ONNX metadata_props / TorchScript extra file ``metadata.json``).

ONNX goes through ``torch.onnx.export(dynamo=True)`` (opset 18; the legacy TorchScript-based exporter
cannot export a complex STFT or rfft at all) with the front end switched to its matmul DFTs
(`features.export_friendly`): the dynamo exporter could map torch.stft / rfft to ONNX DFT ops, but ONNX
Runtime computes those ~100x less accurately than torch's FFT (MFCC features off by up to 0.09, the
8 kHz log-spectrogram's 16000-point resampling FFT worse), while the matmul DFTs match torch to float32
rounding. TorchScript is traced (torch's own FFTs): the clip length is fixed by the trace, the batch size
is not. Every export is verified at once against the PyTorch model (max |difference|, identical top-1
predictions) on `verify_input` clips or test signals.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

log = logging.getLogger(__name__)
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OUTPUTS = ("logits", "probs")
ONNX_OPSET = 18
METADATA_FILE = "metadata.json"  # TorchScript extra file


class ExportedModel(nn.Module):
    """`KWSModel` with the chosen output: logits, or softmax posteriors."""

    def __init__(self, model: nn.Module, output: str = "logits") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} unknown; valid: {list(OUTPUTS)}")
        self.model = model
        self.probs = output == "probs"

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        logits = self.model(waves)
        return torch.softmax(logits, dim=-1) if self.probs else logits


def _example(batch: int, clip_samples: int) -> torch.Tensor:
    # Batch 2, not 1: the exporters would otherwise be free to specialise the batch dimension.
    return torch.randn(batch, clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1


def export_onnx(module: nn.Module, path: Path, clip_samples: int, metadata: dict[str, Any]) -> Path:
    """ONNX (dynamo exporter, one self-contained file) with a dynamic batch axis and metadata_props."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError as error:
        raise RuntimeError(f"ONNX export needs {error.name}: pip install 'kws-lightning[export]'") from None

    from kws_lightning.features import export_friendly

    example = _example(2, clip_samples)
    output = "probs" if getattr(module, "probs", False) else "logits"
    module = export_friendly(copy.deepcopy(module))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["waves"],
            output_names=[output],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_torchscript(module: nn.Module, path: Path, clip_samples: int, metadata: dict[str, Any]) -> Path:
    """Traced TorchScript with ``metadata.json`` as an extra file (fixed clip length, any batch)."""
    with warnings.catch_warnings(), torch.no_grad():
        # The shape checks in the front end become constants of the trace: expected, not a problem.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, _example(2, clip_samples))
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return path


def load_exported(
    path: str | Path, fmt: str, threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A function float32 waves (B, N) -> outputs (B, classes) running the exported file."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise RuntimeError(
                "running ONNX needs onnxruntime: pip install 'kws-lightning[export]'"
            ) from None

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda waves: session.run(None, {name: np.ascontiguousarray(waves, np.float32)})[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+: "switch to torch.export"
            scripted = torch.jit.load(str(path), map_location="cpu")

        def run(waves: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return scripted(torch.from_numpy(np.ascontiguousarray(waves, np.float32))).numpy()

        return run
    raise ValueError(f"format={fmt!r} unknown; valid: {list(FORMATS)}")


def read_metadata(path: str | Path, fmt: str) -> dict[str, Any]:
    """The metadata written into an exported file (labels, sample_rate, clip_samples, output, ...)."""
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: json.loads(p.value) for p in proto.metadata_props}
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def test_signals(count: int, clip_samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Deterministic float clips for verification when no audio is given: noise at several gains,
    tones and chirps, a click train, digital silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(clip_samples) / sample_rate
    clips = []
    for k in range(count):
        kind = k % 5
        if kind == 0:
            clip = rng.standard_normal(clip_samples) * 10 ** rng.uniform(-3, -0.7)
        elif kind == 1:
            clip = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        elif kind == 2:
            clip = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
        elif kind == 3:
            clip = np.zeros(clip_samples)
            clip[:: rng.integers(400, 2000)] = 0.8
        else:
            clip = np.zeros(clip_samples)
        clips.append(clip)
    return np.clip(np.stack(clips), -1.0, 1.0).astype(np.float32)


def verification_waves(predictor: Any, folder: str | None, count: int) -> tuple[np.ndarray, str]:
    """Up to `count` clips of `folder` (any layout, searched recursively, centred pad / crop as in
    evaluation), or test signals when `folder` is None."""
    if not folder:
        return test_signals(count, predictor.clip_samples, predictor.sample_rate), f"{count} test signals"
    from kws_lightning.inference import AudioFiles

    paths = sorted(str(p) for p in Path(folder).expanduser().rglob("*.wav"))
    if not paths:
        raise ValueError(f"verify_input={folder} holds no .wav files")
    # Spread the picks over the sorted list, so several word folders are represented.
    picks = [paths[i] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).astype(int)]
    batch = AudioFiles(picks, predictor.sample_rate).__getitems__(list(range(len(picks))))
    ok = batch["lengths"] > 0
    if not ok.any():
        raise ValueError(f"none of the clips picked from {folder} could be read")
    waves = predictor.views(batch["waves"][ok], batch["lengths"][ok])[0].numpy()
    return waves, f"{len(waves)} clips from {folder}"


def verify(
    reference: nn.Module, run: Callable[[np.ndarray], np.ndarray], waves: np.ndarray
) -> dict[str, Any]:
    """Exported vs PyTorch outputs on `waves`, run as one batch and clip by clip (batch size 1)."""
    with torch.inference_mode():
        expected = reference(torch.from_numpy(waves)).numpy()
    batched = run(waves)
    single = np.concatenate([run(waves[i : i + 1]) for i in range(min(len(waves), 4))])
    diff = max(float(np.abs(batched - expected).max()), float(np.abs(single - expected[: len(single)]).max()))
    return {
        "clips": len(waves),
        "max_abs_diff": diff,
        "max_abs_output": float(np.abs(expected).max()),
        "same_predictions": bool((batched.argmax(1) == expected.argmax(1)).all()),
    }


def export_checkpoint(
    ckpt_path: str,
    fmt: str,
    out: str | Path,
    output: str = "logits",
    verify_input: str | None = None,
    verify_clips: int = 32,
) -> dict[str, Any]:
    """Export one checkpoint; returns the path, size and verification figures."""
    from kws_lightning.inference import Predictor

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} unknown; valid: {list(FORMATS)}")
    predictor = Predictor.from_checkpoints(ckpt_path, "cpu")
    module = ExportedModel(predictor.models[0], output).eval()
    metadata = {
        "labels": predictor.labels,
        "sample_rate": predictor.sample_rate,
        "clip_samples": predictor.clip_samples,
        "input": f"waves float32 (batch, {predictor.clip_samples}) in [-1, 1]",
        "output": output,
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = export_onnx if fmt == "onnx" else export_torchscript
    writer(module, path, predictor.clip_samples, metadata)

    waves, source = verification_waves(predictor, verify_input, verify_clips)
    check = verify(module, load_exported(path, fmt), waves)
    return {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "verified_on": source, **check}


def export(cfg: DictConfig) -> dict[str, Any]:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} unknown; valid: {list(FORMATS)}")
    out = cfg.get("out") or Path(cfg.paths.output_dir) / f"model{FORMATS[cfg.format]}"
    result = export_checkpoint(
        str(cfg.ckpt_path), cfg.format, out, cfg.output, cfg.get("verify_input"), cfg.verify_clips
    )
    print(f"wrote {result['path']} ({result['format']}, {result['bytes'] / 1e6:.2f} MB)")
    print(
        f"verified on {result['verified_on']}: max |diff| {result['max_abs_diff']:.3g} "
        f"(outputs up to {result['max_abs_output']:.3g}), same predictions: {result['same_predictions']}"
    )
    if not result["same_predictions"] or result["max_abs_diff"] > cfg.tolerance:
        raise RuntimeError(
            f"the exported model disagrees with PyTorch (max |diff| {result['max_abs_diff']:.3g} > "
            f"tolerance {cfg.tolerance}, or different predictions): do not use {result['path']}"
        )
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
