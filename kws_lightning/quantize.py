"""int8 ONNX: static quantisation of an exported float model (`kws_lightning.export ... quantize=int8`).

ONNX Runtime's `quantize_static` in QDQ format (QuantizeLinear / DequantizeLinear pairs around int8
weights and activations, per-channel weight scales; biases stay float32), calibrated on training clips
as training feeds them: the data module's training draw (keywords, unknown words and
silence windows cut from the background noise), with its device-side augmentation (time shift,
background noise mixed in), so the activation ranges cover the noisy audio a deployed model hears.
Activation ranges are the 0.01 / 99.99 percentiles, not min / max: on unnormalised MFCCs (-250..+60) a
min / max range spends the 8 bits on rare extremes (DS-CNN, 5 epochs on the dev set: -3.7 points with
min / max, -0.14 with percentiles). Biases stay float: an int32 bias brings a scale and a zero point per
channel, as large as the int8 weights of a small layer (DS-CNN-S: 3.3x smaller weights with float
biases, 2.8x with int32 ones; same accuracy and latency).

The network's input (the features, read by its first convolution or linear layer) is quantised to 16 bits,
everything after it to 8: unnormalised MFCCs span -250..+60, and one int8 step of ~1.2 erases the small
higher coefficients. Chosen on validation (DS-CNN-S, 15 epochs, dev set: int8 input -2.26 points, int16
input -0.48, the same as leaving that first layer float, whose weights then stay float too: 2.6x instead
of 3.3x smaller). `input_bits=8` quantises it like the rest.

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
    predictor: Any, count: int = 400, seed: int = 0, data_root: str | None = None
) -> np.ndarray:
    """`count` float training inputs (count, clip_samples), drawn and augmented as training draws them."""
    import torch

    from kws_lightning.checkpoints import stored_datamodule

    datamodule = stored_datamodule(
        predictor.configs[0],
        predictor.paths[0],
        data_root,
        "quantize=int8 (calibration on its training clips)",
        "pass calibration_root=PATH, the data set it was trained on",
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
    """onnxruntime's CalibrationDataReader over calibration waves, `batch` clips per call."""

    def __init__(self, input_name: str, waves: np.ndarray, batch: int = 16) -> None:
        self.input_name = input_name
        self.waves = waves
        self.batch = batch
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


def check_input_bits(bits: int) -> None:
    """`quantize_input_bits` must be one of INPUT_BITS (a ValueError naming the choices)."""
    if bits not in INPUT_BITS:
        raise ValueError(f"quantize_input_bits={bits}: choose one of {list(INPUT_BITS)}")


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
) -> dict[str, Any]:
    """Statically quantise the float ONNX model at `float_path` to `out` (QDQ, int8 weights and
    activations, per-channel weight scales unless `per_channel` is false, the network's input at
    `input_bits`, front end float); the float file's metadata is carried over, with a `quantization`
    entry. Returns the weight sizes of both files."""
    check_input_bits(input_bits)
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
    try:
        quantization.quantize_static(
            source,
            str(out),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=quantization.CalibrationMethod.Percentile,
            extra_options=extra_options,
        )
    finally:
        if source != str(float_path):
            Path(source).unlink(missing_ok=True)
    quantised = onnx.load(str(out))
    del quantised.metadata_props[:]
    for prop in proto.metadata_props:
        quantised.metadata_props.add(key=prop.key, value=prop.value)
    info = {
        "format": "QDQ int8 (onnxruntime quantize_static, percentile calibration)",
        "calibration_percentile": CALIBRATION_PERCENTILE,
        "per_channel": per_channel,
        "network_input_bits": input_bits if features is not None else 8,
        "calibration_clips": int(len(waves)),
        "float_nodes": "front end",
    }
    quantised.metadata_props.add(key="quantization", value=json.dumps(info))
    onnx.save(quantised, str(out))
    return {"float": weight_sizes(proto, set(excluded)), "int8": weight_sizes(quantised, set(excluded))}


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
