"""`python -m kws_lightning.export ckpt_path=CKPT format=onnx|torchscript [out=...] [output=logits|probs]`.

The exported graph is the whole `KWSModel`, front end included: input ``waves`` float32 (batch,
clip_samples) at the model's sample rate (16000 x 16 kHz by default), in [-1, 1]; output ``logits`` or
``probs`` (batch, classes); the batch size is dynamic. Class names, sample rate and clip length travel
inside the file (ONNX metadata_props / TorchScript extra file ``metadata.json``).

ONNX goes through ``torch.onnx.export(dynamo=True)`` (opset 18; the legacy TorchScript-based exporter
cannot export a complex STFT or rfft at all) with the front end switched to its matmul DFTs
(`features.export_friendly`): the dynamo exporter could map torch.stft / rfft to ONNX DFT ops, but ONNX
Runtime computes those ~100x less accurately than torch's FFT (MFCC features off by up to 0.09, the
8 kHz log-spectrogram's 16000-point resampling FFT worse), while the matmul DFTs (float64, like torch's:
features.py) give the FFT path's float32 power spectrum. TorchScript is traced (torch's own FFTs): the
clip length is fixed by the trace, the batch size is not. Every export is verified at once against the
PyTorch model (max |difference|, identical top-1 predictions; `agrees`) on `verify_input` clips or test
signals (`test_signals`: the hard cases and speech-like syllables), written beside `out` and renamed onto
it only once verified.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from kws_lightning.utils.checkpoint_io import temporary_path

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


class ExportedRunner(nn.Module):
    """An exported file as a module: float waves (B, N) -> logits (B, classes), on the CPU, so a `Predictor`
    scores it exactly as it scores a checkpoint's `KWSModel` (a `probs` export returns log-posteriors,
    which the predictor's softmax turns back into the same posteriors)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        path = Path(path).expanduser()
        fmt = next((f for f, suffix in FORMATS.items() if path.suffix == suffix), None)
        if fmt is None:
            raise ValueError(
                f"model_path={path}: not an exported model (.onnx or .pt of kws_lightning.export)"
            )
        if not path.is_file():
            raise ValueError(
                f"model_path={path} does not exist: export one with python -m kws_lightning.export"
            )
        self.path, self.format = path, fmt
        try:
            self.metadata = read_metadata(path, fmt)
        except Exception as error:  # a damaged or foreign file: say which and why, no deep traceback
            raise ValueError(f"model_path={path} cannot be read as {fmt}: {error}") from None
        missing = [k for k in ("labels", "sample_rate", "clip_samples") if k not in self.metadata]
        if missing:
            raise ValueError(
                f"model_path={path} lacks the metadata {missing}: export it with kws_lightning.export"
            )
        self.run = load_exported(path, fmt, threads)
        self.probs = self.metadata.get("output") == "probs"

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(np.asarray(self.run(waves.detach().cpu().float().numpy()), np.float32))
        return torch.log(out.clamp_min(1e-30)) if self.probs else out


def _json_or_text(value: str) -> Any:
    # Tools that rewrite a graph (onnxruntime's quantiser, optimisers) may add plain-text entries.
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def read_metadata(path: str | Path, fmt: str) -> dict[str, Any]:
    """The metadata written into an exported file (labels, sample_rate, clip_samples, output, ...)."""
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: _json_or_text(p.value) for p in proto.metadata_props}
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


# What `test_signals` clip k is (k modulo the length), for the verification's worst case.
SIGNAL_KINDS = ("noise", "tone", "chirp", "click train", "digital silence", "vowel", "fricative + vowel")


def test_signals(count: int, clip_samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Deterministic float clips for verification when no audio is given, cycling through `SIGNAL_KINDS`:
    noise at several gains, a tone, a chirp, a click train, digital silence (the hard cases: pure float
    signals with 100+ dB between a frame's strongest and weakest bands, or features constant over the
    clip), and speech-like syllables (`_syllable`: voiced, and with a fricative onset) in background noise,
    rounded to 16 bits as a recording would be."""
    rng = np.random.default_rng(seed)
    t = np.arange(clip_samples) / sample_rate
    clips = []
    for k in range(count):
        kind = k % len(SIGNAL_KINDS)
        if kind == 0:
            clip = rng.standard_normal(clip_samples) * 10 ** rng.uniform(-3, -0.7)
        elif kind == 1:
            clip = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        elif kind == 2:
            clip = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
        elif kind == 3:
            clip = np.zeros(clip_samples)
            clip[:: rng.integers(400, 2000)] = 0.8
        elif kind == 4:
            clip = np.zeros(clip_samples)
        else:
            clip = _syllable(rng, clip_samples, sample_rate, fricative=kind == 6)
            clip = np.round(np.clip(clip, -1.0, 1.0) * 32767) / 32768
        clips.append(clip)
    return np.clip(np.stack(clips), -1.0, 1.0).astype(np.float32)


def _syllable(rng: np.random.Generator, clip_samples: int, sample_rate: int, fricative: bool) -> np.ndarray:
    """A synthetic syllable: a glottal pulse train (pitch gliding within 90..250 Hz) through three formant
    resonators, under a ~0.3 s envelope at a random level; optionally after a band-passed noise burst
    (a fricative); in white background noise 40..70 dB below its peak."""
    from scipy import signal

    t = np.arange(clip_samples) / sample_rate
    f0 = rng.uniform(90, 250) * (1 + rng.uniform(-0.25, 0.25) * t / t[-1])
    pulses = np.diff(np.floor(np.cumsum(f0) / sample_rate), prepend=0.0)
    voiced = pulses
    for centre, bandwidth in zip(
        (rng.uniform(300, 850), rng.uniform(900, 2400), rng.uniform(2500, 3500)), (80, 120, 180), strict=True
    ):
        radius = np.exp(-np.pi * bandwidth / sample_rate)
        angle = 2 * np.pi * centre / sample_rate
        voiced = signal.lfilter([1 - radius], [1, -2 * radius * np.cos(angle), radius**2], voiced)
    onset = rng.uniform(0.25, 0.45)
    clip = voiced * np.exp(-(((t - onset - 0.15) / 0.1) ** 4))
    if fricative:
        sos = signal.butter(
            4, [2500, min(6500, 0.45 * sample_rate)], "bandpass", fs=sample_rate, output="sos"
        )
        hiss = signal.sosfilt(sos, rng.standard_normal(clip_samples)) * np.exp(
            -(((t - onset + 0.05) / 0.06) ** 2)
        )
        clip = clip / np.abs(clip).max() + 0.5 * hiss / np.abs(hiss).max()
    clip = clip / np.abs(clip).max() * 10 ** rng.uniform(-1.5, -0.3)
    return clip + rng.standard_normal(clip_samples) * np.abs(clip).max() * 10 ** rng.uniform(-3.5, -2)


def verification_waves(predictor: Any, folder: str | None, count: int) -> tuple[np.ndarray, str, list[str]]:
    """Up to `count` clips of `folder` (any layout, searched recursively, centred pad / crop as in
    evaluation), or test signals when `folder` is None; with a name for each clip."""
    if not folder:
        waves = test_signals(count, predictor.clip_samples, predictor.sample_rate)
        names = [f"test signal {k} ({SIGNAL_KINDS[k % len(SIGNAL_KINDS)]})" for k in range(count)]
        return waves, f"{count} test signals", names
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
    names = [pick for pick, read in zip(picks, ok.tolist(), strict=True) if read]
    return waves, f"{len(waves)} clips from {folder}", names


def verify(
    reference: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    waves: np.ndarray,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Exported vs PyTorch outputs on `waves`, run as one batch and clip by clip (batch size 1); `worst`
    names the clip with the largest difference (`names[i]`, else its index)."""
    with torch.inference_mode():
        expected = reference(torch.from_numpy(waves)).numpy()
    batched = run(waves)
    single = np.concatenate([run(waves[i : i + 1]) for i in range(min(len(waves), 4))])
    per_clip = np.abs(batched - expected).max(axis=1)
    per_clip[: len(single)] = np.maximum(
        per_clip[: len(single)], np.abs(single - expected[: len(single)]).max(1)
    )
    worst = int(per_clip.argmax())
    return {
        "clips": len(waves),
        "max_abs_diff": float(per_clip[worst]),
        "worst": names[worst] if names else f"clip {worst}",
        "max_abs_output": float(np.abs(expected).max()),
        "same_predictions": bool((batched.argmax(1) == expected.argmax(1)).all()),
    }


def agrees(check: dict[str, Any], tolerance: float) -> bool:
    """Whether a `verify` result passes: the same top-1 predictions, and max |difference| within
    `tolerance` plus 8 float32 rounding steps of the largest output (2.9e-5 for logits of 30; a linear
    head on unnormalised log-mel, logits ~3000, differs by 1e-3 from rounding alone: no float32 graph
    can do better)."""
    slack = 8 * float(np.finfo(np.float32).eps) * check["max_abs_output"]
    return check["same_predictions"] and check["max_abs_diff"] <= tolerance + slack


def export_checkpoint(
    ckpt_path: str,
    fmt: str,
    out: str | Path,
    output: str = "logits",
    verify_input: str | None = None,
    verify_clips: int = 32,
    quantize: str = "none",
    calibration_clips: int = 400,
    calibration_root: str | None = None,
    per_channel: bool = True,
    input_bits: int = 16,
    calibration: str = "auto",
    activation_bits: int = 8,
    cache_dir: str | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Export one checkpoint; returns the path, size and verification figures. Each file is written beside
    its path and renamed onto it once verified: with a `tolerance`, an export whose max |difference| from
    PyTorch exceeds it, or that changes a top-1 prediction, is a RuntimeError and writes nothing (the
    int8 file is reported, not held to it). With quantize=int8 (ONNX
    only) `out` is the float model and the int8 model goes beside it as <stem>.int8.onnx
    (kws_lightning/quantize.py: `per_channel` weight scales, the network's input at `input_bits`, activation
    ranges by `calibration`, the other activations at `activation_bits`); its figures are under the "int8"
    key. Calibration decodes the training clips into `cache_dir` (the command's paths.cache_dir; None: in
    memory), never into the folder the checkpoint names."""
    from kws_lightning.inference import Predictor
    from kws_lightning.quantize import QUANTIZE, check_bits, check_calibration
    from kws_lightning.stream_bench.settings import STORED_KEY, stored_settings

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} unknown; valid: {list(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} unknown; valid: {list(QUANTIZE)}")
    if quantize != "none" and fmt != "onnx":
        raise ValueError(f"quantize={quantize} needs format=onnx (onnxruntime's quantisation)")
    check_bits("quantize_input_bits", input_bits)
    check_bits("quantize_activation_bits", activation_bits)
    check_calibration(calibration)
    predictor = Predictor.from_checkpoints(ckpt_path, "cpu")
    module = ExportedModel(predictor.models[0], output).eval()
    metadata = {
        "labels": predictor.labels,
        "sample_rate": predictor.sample_rate,
        "clip_samples": predictor.clip_samples,
        "input": f"waves float32 (batch, {predictor.clip_samples}) in [-1, 1]",
        "output": output,
        "checkpoint": str(Path(ckpt_path).resolve()),
        # The data config, so `eval model_path=...` rebuilds the same test draw as for the checkpoint.
        "data": predictor.configs[0].get("data"),
    }
    tuned = stored_settings([ckpt_path], predictor.labels)
    if tuned is not None:  # detector settings tuned on validation streams travel with the model
        metadata[STORED_KEY] = tuned.to_dict()
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    waves, source, names = verification_waves(predictor, verify_input, verify_clips)
    writer = export_onnx if fmt == "onnx" else export_torchscript
    with _written_beside(path) as partial:
        writer(module, partial, predictor.clip_samples, metadata)
        check = verify(module, load_exported(partial, fmt), waves, names)
        if tolerance is not None and not agrees(check, tolerance):
            raise RuntimeError(
                f"the exported model disagrees with PyTorch (max |diff| {check['max_abs_diff']:.3g} > "
                f"tolerance {tolerance}, or different predictions; worst: {check['worst']}, verified on "
                f"{source}): nothing written to {path}"
            )
    result = {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "verified_on": source, **check}
    if quantize == "int8":
        from kws_lightning.quantize import calibration_waves, quantize_int8

        int8_path = path.with_name(f"{path.stem}.int8{path.suffix}")
        calibration_set = calibration_waves(
            predictor, calibration_clips, data_root=calibration_root, cache_dir=cache_dir
        )
        validation = None
        if calibration == "auto":  # the methods are compared on the checkpoint's validation draw
            from kws_lightning.eval import datamodule_test_set

            validation = datamodule_test_set(predictor, cache_dir, 64, 0, calibration_root, "validation")
        with _written_beside(int8_path) as partial:
            sizes = quantize_int8(
                path,
                partial,
                calibration_set,
                per_channel,
                input_bits,
                calibration,
                validation,
                activation_bits,
            )
            check = verify(module, load_exported(partial, fmt), waves, names)
        result["weights"] = sizes["float"]
        result["int8"] = {
            "path": str(int8_path),
            "bytes": int8_path.stat().st_size,
            **check,
            **sizes["int8"],
            "calibration": sizes["calibration"],
            "calibration_scores": sizes["calibration_scores"],
        }
    return result


@contextlib.contextmanager
def _written_beside(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` (hidden, named after this process) to write to: renamed onto `path`
    when the block succeeds, removed when it raises, so `path` only ever holds a finished, verified file."""
    partial = temporary_path(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def export(cfg: DictConfig) -> dict[str, Any]:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} unknown; valid: {list(FORMATS)}")
    out = cfg.get("out") or Path(cfg.paths.output_dir) / f"model{FORMATS[cfg.format]}"
    result = export_checkpoint(
        str(cfg.ckpt_path),
        cfg.format,
        out,
        cfg.output,
        cfg.get("verify_input"),
        cfg.verify_clips,
        cfg.get("quantize", "none"),
        cfg.get("calibration_clips", 400),
        cfg.get("calibration_root"),
        bool(cfg.get("quantize_per_channel", True)),
        int(cfg.get("quantize_input_bits", 16)),
        str(cfg.get("quantize_calibration", "auto")),
        int(cfg.get("quantize_activation_bits", 8)),
        cfg.paths.cache_dir,
        float(cfg.tolerance),
    )
    print(f"wrote {result['path']} ({result['format']}, {result['bytes'] / 1e6:.2f} MB)")
    print(
        f"verified on {result['verified_on']}: max |diff| {result['max_abs_diff']:.3g} "
        f"(outputs up to {result['max_abs_output']:.3g}; worst: {result['worst']}), "
        f"same predictions: {result['same_predictions']}"
    )
    if "int8" in result:
        q, w = result["int8"], result["weights"]
        print(
            f"wrote {q['path']} (int8 QDQ, {q['bytes'] / 1e6:.2f} MB); network weights "
            f"{w['network_bytes']} -> {q['network_bytes']} bytes "
            f"({w['network_bytes'] / max(q['network_bytes'], 1):.2f}x smaller), "
            f"front-end constants {w['frontend_bytes']} -> {q['frontend_bytes']} bytes (kept float)"
        )
        scores = q["calibration_scores"]
        choices = ", ".join(f"{m} {v['kl']:.4g}" for m, v in scores.items())
        compared = f" (KL from float on validation clips: {choices})" if choices else ""
        print(f"activation ranges: {q['calibration']}{compared}")
        print(
            f"int8 vs PyTorch on {result['verified_on']}: max |diff| {q['max_abs_diff']:.3g} (worst: "
            f"{q['worst']}), same top-1 "
            f"predictions: {q['same_predictions']} (score accuracy with `eval model_path={q['path']}`)"
        )
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from kws_lightning.utils.cli_errors import one_line_errors

    with one_line_errors(code=2):
        export(cfg)


if __name__ == "__main__":
    main()
