"""int8 ONNX: static quantisation of an exported float model (`kws_lightning.export ... quantize=int8`).

ONNX Runtime's `quantize_static` in QDQ format (QuantizeLinear / DequantizeLinear pairs around int8
weights and activations, per-channel weight scales; biases stay float32), calibrated on training clips
as training feeds them: the data module's training draw (keywords, unknown words and
silence windows cut from the background noise), with its device-side augmentation (time shift,
background noise mixed in), so the activation ranges cover the noisy audio a deployed model hears.
Activation ranges: the 0.01 / 99.99 percentiles or min / max (`calibration`). `auto` (the default)
quantises with both and keeps the one whose posteriors on the checkpoint's validation clips are closer to
the float model's (mean KL divergence; labels are not used). Percentile clipping spends no bits on rare
extremes and usually wins (converged DS-CNN-S, validation draw: KL 0.011 vs 0.089, accuracy -0.48 vs -2.03
points; TC-ResNet14: KL 1e-4 vs 2e-4, equal accuracy); min / max is for a model whose rare large
activations matter. Choosing by validation *accuracy* instead was tried and did not carry over: for
BC-ResNet-1 min / max scored 0.12 point above float on the 839 validation clips (percentiles 1.31 below)
but lost 1.58 points on the test draw (percentiles 1.15), as its higher KL (0.026 vs 0.022) foretold.

Biases stay float: an int32 bias brings a scale and a zero point per
channel, as large as the int8 weights of a small layer (DS-CNN-S: 3.3x smaller weights with float
biases, 2.8x with int32 ones; same accuracy and latency).

The network's input (the features, read by its first convolution or linear layer) is quantised to 16 bits,
everything after it to 8: unnormalised MFCCs span -250..+60, and one int8 step of ~1.2 erases the small
higher coefficients. Chosen on validation (DS-CNN-S, 15 epochs, dev set: int8 input -2.26 points, int16
input -0.48, the same as leaving that first layer float, whose weights then stay float too: 2.6x instead
of 3.3x smaller). `input_bits=8` quantises it like the rest.

`activation_bits=16` quantises every activation to int16 and the weights to int8 (TFLite's "16x8" mode),
for models whose int8 activations cost accuracy. BC-ResNet-1 (converged; validation draw) keeps its float
accuracy with it (KL from float 0.0005 vs 0.020 with int8 activations; 0.12 vs 1.43 points lost; test 0.14
vs 0.57) at 3.05x smaller weights. Its SubSpectralNorm's folded scale / shift constants, which ONNX
Runtime quantises like activations, become int16 too: int8 per tensor they cost 1.07 points, and per
channel their scales outweigh them.

The front end stays float: its nodes (the exporter's `model.frontend` name scope) are excluded. Its
matmul DFTs and log make the dynamic range of an MFCC enormous (digital silence vs speech), which eight
bits cannot hold, and it is a small share of the compute. `weight_sizes` reports the network's weights
and the front end's constants separately (the DFT matrices and frame indices are most of the file).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
QUANTIZE = ("none", "int8")
FRONTEND_SCOPE = "model.frontend"  # the dynamo exporter's name scope of KWSModel.frontend
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CALIBRATION_PERCENTILE = 99.99


def _import_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise RuntimeError(
            "int8 quantisation needs onnxruntime: pip install 'kws-lightning[export]'"
        ) from None
    return quantization


def frontend_nodes(proto: Any) -> list[str]:
    """Names of the nodes the exporter placed in the front end's name scope (kept float)."""
    names = []
    for node in proto.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), "")
        if FRONTEND_SCOPE in scopes:
            names.append(node.name)
    return names


def calibration_waves(
    predictor: Any,
    count: int = 400,
    seed: int = 0,
    data_root: str | None = None,
    cache_dir: str | None = None,
) -> np.ndarray:
    """`count` float training inputs (count, clip_samples), drawn and augmented as training draws them;
    decoded into this run's `cache_dir` (None: in memory), never the checkpoint's."""
    import torch

    from kws_lightning.checkpoints import stored_datamodule

    datamodule = stored_datamodule(
        predictor.configs[0],
        predictor.paths[0],
        data_root,
        "quantize=int8 (calibration on its training clips)",
        "pass calibration_root=PATH, the data set it was trained on",
        cache_dir=cache_dir,
        num_workers=0,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(seed)  # the augmentation's draws
    waves = []
    total = 0
    for batch in datamodule.train_dataloader():
        with torch.no_grad():
            inputs = datamodule.to_model_input(batch, train=True)
        waves.append(inputs.float().numpy())
        total += len(inputs)
        if total >= count:
            break
    return np.concatenate(waves)[:count].astype(np.float32)


class WaveReader:
    """onnxruntime's CalibrationDataReader over calibration waves, in batches of equal size: the largest
    divisor of the clip count up to `batch` (onnxruntime's percentile collector stacks every batch's
    activations into one array, which a shorter last batch made ragged: calibration_clips=20 failed with
    "setting an array element with a sequence"). The ranges do not depend on how the clips are batched."""

    def __init__(self, input_name: str, waves: np.ndarray, batch: int = 16) -> None:
        self.input_name = input_name
        self.waves = waves
        self.batch = max((d for d in range(1, min(batch, len(waves)) + 1) if len(waves) % d == 0), default=1)
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for first in range(0, len(self.waves), self.batch):
            yield {self.input_name: np.ascontiguousarray(self.waves[first : first + self.batch])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def fold_batchnorm(proto: Any, skip: set[str]) -> int:
    """Rewrite each inference-mode BatchNormalization (outside `skip`) as Mul + Add by its folded per-channel
    scale and shift, in place; returns how many. The exporter folds a BatchNorm into the conv before it,
    but not BC-ResNet's SubSpectralNorm (a reshape sits between): onnxruntime does not quantise a
    BatchNormalization, while Mul / Add constants become int8 like weights."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes, folded = [], 0
    for node in proto.graph.node:
        params = node.input[1:5]
        if node.op_type != "BatchNormalization" or node.name in skip or not all(p in inits for p in params):
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        # Channels on axis 1 of an (N, C, ...) input: broadcast over the remaining axes.
        rank = _rank(proto, node.input[0])
        shape = (-1,) + (1,) * max(rank - 2, 0)
        names = (f"{node.name}_scale", f"{node.name}_shift")
        for name, value in zip(names, (scale, shift), strict=True):
            proto.graph.initializer.append(
                numpy_helper.from_array(value.reshape(shape).astype(np.float32), name)
            )
        scaled = f"{node.output[0]}_scaled"
        nodes.append(helper.make_node("Mul", [node.input[0], names[0]], [scaled], name=f"{node.name}_mul"))
        nodes.append(helper.make_node("Add", [scaled, names[1]], [node.output[0]], name=f"{node.name}_add"))
        folded += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    kept = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return folded


def _rank(proto: Any, name: str) -> int:
    """Rank of tensor `name` from the graph's shape information (4 when unknown: image-like convs)."""
    for info in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return 4


INPUT_BITS = (8, 16)
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# Activation-range methods; `auto` tries each (percentile first: it wins ties) and keeps the closer model.
CALIBRATION_METHODS = {"percentile": "Percentile", "minmax": "MinMax"}
CALIBRATIONS = ("auto", *CALIBRATION_METHODS)


def check_calibration(calibration: str) -> None:
    """`quantize_calibration` must be one of CALIBRATIONS (a ValueError naming the choices)."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"quantize_calibration={calibration!r}: choose one of {list(CALIBRATIONS)}")


def check_bits(setting: str, bits: int) -> None:
    """`setting` (quantize_input_bits, quantize_activation_bits) must be one of INPUT_BITS (a ValueError
    naming the choices)."""
    if bits not in INPUT_BITS:
        raise ValueError(f"{setting}={bits}: choose one of {list(INPUT_BITS)}")


def network_input(proto: Any, frontend: set[str]) -> str | None:
    """The tensor the network's first convolution / linear layer reads (its features), or None."""
    first = next((n for n in proto.graph.node if n.name not in frontend and n.op_type in COMPUTE_OPS), None)
    return None if first is None else first.input[0]


def quantize_int8(
    float_path: str | Path,
    out: str | Path,
    waves: np.ndarray,
    per_channel: bool = True,
    input_bits: int = 16,
    calibration: str = "auto",
    validation: Any = None,
    activation_bits: int = 8,
) -> dict[str, Any]:
    """Statically quantise the float ONNX model at `float_path` to `out` (QDQ, int8 weights, per-channel
    weight scales unless `per_channel` is false, the network's input at `input_bits`, every other
    activation at `activation_bits`, front end float), activation ranges from `waves` by `calibration`
    (`auto`: each method, the one closer to the float model on the checkpoint's `validation` draw kept,
    an `eval.EvalSet`); the float file's metadata is carried over, with a `quantization` entry. Returns
    the weight sizes of both files and the calibration figures."""
    check_bits("quantize_input_bits", input_bits)
    check_bits("quantize_activation_bits", activation_bits)
    check_calibration(calibration)
    if calibration == "auto" and validation is None:
        raise ValueError("quantize_calibration=auto needs the validation draw to compare the methods on")
    import onnx

    quantization = _import_quantization()
    proto = onnx.load(str(float_path))
    excluded = frontend_nodes(proto)
    if not excluded:
        log.warning("%s: no front-end nodes found by name scope; the whole graph is quantised", float_path)
    input_name = proto.graph.input[0].name
    reader = WaveReader(input_name, waves)
    prepared = onnx.load(str(float_path))
    source = str(float_path)
    if fold_batchnorm(prepared, set(excluded)):
        source = str(Path(out).with_suffix(".folded.tmp"))
        onnx.save(prepared, source)
    extra_options: dict[str, Any] = {"CalibPercentile": CALIBRATION_PERCENTILE, "QuantizeBias": False}
    features = network_input(prepared, set(excluded))
    if input_bits == 16 and features is not None:
        extra_options["TensorQuantOverrides"] = {features: [{"quant_type": quantization.QuantType.QInt16}]}
    small = small_channel_weights(prepared, set(excluded)) if per_channel else []
    overrides = extra_options.setdefault("TensorQuantOverrides", {})
    for name in small:  # one scale for the tensor: a scale per channel would outweigh its weights
        overrides[name] = [{"quant_type": quantization.QuantType.QInt8}]
    activation_type = quantization.QuantType.QInt16 if activation_bits == 16 else quantization.QuantType.QInt8
    methods = list(CALIBRATION_METHODS) if calibration == "auto" else [calibration]
    candidates = {m: Path(out).with_name(f"{Path(out).stem}.{m}.tmp.onnx") for m in methods}
    info = {
        "format": "QDQ int8 (onnxruntime quantize_static)",
        "calibration_requested": calibration,
        "per_channel": per_channel,
        "per_tensor_small_weights": small,
        "network_input_bits": max(input_bits, activation_bits) if features is not None else activation_bits,
        "activation_bits": activation_bits,
        "calibration_clips": int(len(waves)),
        "float_nodes": "front end",
    }
    scores: dict[str, dict[str, float]] = {}
    try:
        for method, path in candidates.items():
            reader.rewind()
            quantization.quantize_static(
                source,
                str(path),
                reader,
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=activation_type,
                weight_type=quantization.QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=getattr(quantization.CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options=extra_options,
            )
            candidate = onnx.load(str(path))
            drop_zero_points(candidate)
            # The float file's metadata (labels, input format, data config) makes each one scorable.
            percentile = CALIBRATION_PERCENTILE if method == "percentile" else None
            entry = {**info, "calibration": method, "calibration_percentile": percentile}
            _set_metadata(candidate, proto, entry)
            onnx.save(candidate, str(path))
        chosen = calibration
        if calibration == "auto":
            chosen, scores = choose_calibration(float_path, candidates, validation)
        quantised = onnx.load(str(candidates[chosen]))
        _set_metadata(quantised, quantised, {"calibration_scores": scores})
        onnx.save(quantised, str(out))
    finally:
        for path in [*candidates.values(), Path(source)]:
            if path != Path(float_path):
                path.unlink(missing_ok=True)
    return {
        "float": weight_sizes(proto, set(excluded)),
        "int8": weight_sizes(quantised, set(excluded)),
        "calibration": chosen,
        "calibration_scores": scores,
    }


SCALE_BYTES = 4  # a float32 scale per channel (zero points dropped: drop_zero_points)


def small_channel_weights(proto: Any, frontend: set[str]) -> list[str]:
    """Conv weights (outside `frontend`) with at most SCALE_BYTES int8 weights per output channel (e.g.
    BC-ResNet's 3-tap depthwise convolutions): per-channel scales would take more bytes than the weights
    they scale, so these get one scale per tensor (BC-ResNet-1 with 16-bit activations, validation: KL
    from float 0.0002 -> 0.0005, accuracy 1 clip lower; weights 2.8x -> 3.05x smaller)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    small = []
    for node in proto.graph.node:
        if node.op_type != "Conv" or node.name in frontend or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]]).shape
        if len(shape) > 1 and int(np.prod(shape[1:])) <= SCALE_BYTES:
            small.append(node.input[1])
    return small


def drop_zero_points(model: Any) -> int:
    """Remove all-zero zero points of weight DequantizeLinear nodes of `model` (a ModelProto, in place: an
    optional input whose default is 0, the int8 weights being symmetric); returns how many. Lossless: one
    byte per channel of every per-channel weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dropped = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        zero_point = inits.get(node.input[2])
        if zero_point is not None and not numpy_helper.to_array(zero_point).any():
            del node.input[2]
            dropped += 1
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return dropped


def _set_metadata(model: Any, source: Any, quantization: dict[str, Any]) -> None:
    """Give `model` (a ModelProto, in place) the metadata of `source` (another, or itself), its
    `quantization` entry updated by `quantization` (JSON values, as the exporter writes them)."""
    meta = {p.key: p.value for p in source.metadata_props}
    merged = {**json.loads(meta.get("quantization", "{}")), **quantization}
    meta["quantization"] = json.dumps(merged)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def fidelity_to(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How close `candidate` posteriors (N, classes) are to `reference`: mean KL(reference || candidate)
    in nats, and the share of rows with the same top-1 class."""
    eps = 1e-12
    kl = (reference * (np.log(reference + eps) - np.log(candidate + eps))).sum(axis=1)
    agreement = (reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()
    return {"kl": float(kl.mean()), "agreement": float(agreement)}


def pick_calibration(figures: dict[str, dict[str, float]]) -> str:
    """The method whose posteriors are closest to the float model's (lowest mean KL); the first listed
    wins a tie. Accuracy is not the criterion: see the module's docstring."""
    best = min(f["kl"] for f in figures.values())
    return next(name for name, f in figures.items() if f["kl"] <= best * (1 + 1e-9) + 1e-15)


def choose_calibration(
    float_path: str | Path, candidates: dict[str, Path], validation: Any
) -> tuple[str, dict[str, dict[str, float]]]:
    """Score each candidate int8 file on the checkpoint's validation draw (an `eval.EvalSet`, scored as
    `eval` scores it) against the float export: mean KL, top-1 agreement, and (for the record) accuracy;
    returns the `pick_calibration` choice and every candidate's figures."""
    from kws_lightning.eval import score
    from kws_lightning.inference import Predictor

    reference, targets = score(Predictor.from_exported(float_path, threads=1), validation)
    figures = {}
    for name, path in candidates.items():
        probs, _ = score(Predictor.from_exported(path, threads=1), validation)
        figures[name] = {
            "accuracy": float((probs.argmax(axis=1) == targets).mean()),
            "clips": int(len(targets)),
            **fidelity_to(reference.astype(np.float64), probs.astype(np.float64)),
        }
    chosen = pick_calibration(figures)
    for name, f in figures.items():
        log.info(
            "int8 calibration %s on validation: KL from float %.5f, top-1 agreement %.4f, accuracy %.4f%s",
            name, f["kl"], f["agreement"], f["accuracy"], " (kept)" if name == chosen else "",
        )  # fmt: skip
    return chosen, figures


def weight_sizes(proto: Any, frontend: set[str]) -> dict[str, int]:
    """Bytes of constants (initializers) used by the front end's nodes vs the rest (the network)."""
    from onnx import numpy_helper

    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.name)
    sizes = {"frontend_bytes": 0, "network_bytes": 0}
    for init in proto.graph.initializer:
        nbytes = numpy_helper.to_array(init).nbytes
        users = consumers.get(init.name, set())
        key = "frontend_bytes" if users and users <= frontend else "network_bytes"
        sizes[key] += nbytes
    return sizes
