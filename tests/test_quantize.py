"""int8 export (kws_lightning/quantize.py): a statically quantised ONNX model of a small trained model agrees
with the float model, its network weights are at least 3x smaller with the front end left float, and
`eval` / `listen` score it through `model_path=` exactly as they score a checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.export import export_checkpoint
from kws_lightning.inference import Predictor
from kws_lightning.quantize import WaveReader, frontend_nodes


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("int8") / "model.onnx"
    cache_dir = str(tiny_checkpoint["cache_dir"])  # calibration decodes there (the command's paths.cache_dir)
    return export_checkpoint(
        str(tiny_checkpoint["ckpt"]),
        "onnx",
        out,
        quantize="int8",
        calibration_clips=128,
        verify_clips=8,
        cache_dir=cache_dir,
    )


def test_int8_file_is_quantised_in_the_network_only(int8_export: dict) -> None:
    float_proto = onnx.load(int8_export["path"])
    proto = onnx.load(int8_export["int8"]["path"])
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [
        i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1
    ]
    assert int8_weights, "no int8 weight tensor in the quantised graph"
    # The front end's nodes are all still there, none reading a dequantised tensor.
    names = set(frontend_nodes(float_proto))
    assert names and names <= {n.name for n in proto.graph.node}
    dequantised = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not any(set(n.input) & dequantised for n in proto.graph.node if n.name in names)
    # Network weights at least 3x smaller; the front end's constants unchanged; the file smaller.
    before, after = int8_export["weights"], int8_export["int8"]
    assert after["network_bytes"] * 3 <= before["network_bytes"]
    assert after["frontend_bytes"] == before["frontend_bytes"] > 0
    assert after["bytes"] < int8_export["bytes"]
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["labels"] and meta["quantization"]["calibration_clips"] == 128 and meta["data"]["_target_"]


def zero_point_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Each QuantizeLinear's input tensor -> the data type of its zero point (INT8, INT16)."""
    initializers = {i.name: i.data_type for i in proto.graph.initializer}
    return {n.input[0]: initializers[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("bits", [16, 8])
def test_the_network_input_is_quantised_to_input_bits(
    bits: int, int8_export: dict, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    from kws_lightning.quantize import network_input

    if bits == 16:  # the default export
        exported = int8_export
    else:
        exported = export_checkpoint(
            str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / "m.onnx", quantize="int8",
            calibration_clips=32, verify_clips=4, input_bits=8, cache_dir=str(tiny_checkpoint["cache_dir"]),
        )  # fmt: skip
    float_proto = onnx.load(exported["path"])
    features = network_input(float_proto, set(frontend_nodes(float_proto)))
    proto = onnx.load(exported["int8"]["path"])
    types = zero_point_types(proto)
    wanted = onnx.TensorProto.INT16 if bits == 16 else onnx.TensorProto.INT8
    # The features (the front end's output the first layer reads) at `bits`; every other activation int8.
    assert types.pop(features) == wanted
    assert types and set(types.values()) == {onnx.TensorProto.INT8}
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["quantization"]["network_input_bits"] == bits


def test_16_bit_activations_with_int8_weights(
    int8_export: dict, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    """activation_bits=16 (TFLite's 16x8 mode): every activation int16, conv / linear weights still int8,
    and the model closer to the float one than with int8 activations (KL on the validation clips)."""
    exported = export_checkpoint(
        str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / "m.onnx", quantize="int8",
        calibration_clips=128, verify_clips=8, activation_bits=16,
        cache_dir=str(tiny_checkpoint["cache_dir"]),
    )  # fmt: skip
    proto = onnx.load(exported["int8"]["path"])
    types = zero_point_types(proto)
    assert types and set(types.values()) == {onnx.TensorProto.INT16}
    initializers = {i.name: i for i in proto.graph.initializer}
    dequantised = [initializers.get(n.input[0]) for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    weights = [w for w in dequantised if w is not None and len(w.dims) > 1]
    assert weights and {w.data_type for w in weights} == {onnx.TensorProto.INT8}
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["quantization"])
    assert meta["activation_bits"] == 16 and meta["network_input_bits"] == 16
    closer = exported["int8"]["calibration_scores"][exported["int8"]["calibration"]]["kl"]
    int8 = int8_export["int8"]["calibration_scores"][int8_export["int8"]["calibration"]]["kl"]
    assert closer < int8
    with pytest.raises(ValueError, match=r"quantize_activation_bits=4: choose one of \[8, 16\]"):
        export_checkpoint(
            str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / "n.onnx", quantize="int8", activation_bits=4
        )


def test_other_input_bits_are_refused_before_any_work(tiny_checkpoint: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"quantize_input_bits=12: choose one of \[8, 16\]"):
        export_checkpoint(
            str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / "m.onnx", quantize="int8", input_bits=12
        )
    assert not (tmp_path / "m.onnx").exists()


def test_int8_agrees_with_the_float_model(int8_export: dict, tiny_checkpoint: dict) -> None:
    root = tiny_checkpoint["data_root"]
    testing = (root / "testing_list.txt").read_text().split()
    clips = [read_audio_int16(root / rel) for rel in testing[:: max(1, len(testing) // 80)]]
    reference = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu").predict_arrays(clips)
    exported = Predictor.from_exported(int8_export["path"]).predict_arrays(clips)
    int8 = Predictor.from_exported(int8_export["int8"]["path"]).predict_arrays(clips)
    assert np.abs(exported - reference).max() < 1e-3  # the float export is the checkpoint
    # The tiny model is barely trained (near-uniform posteriors), so a top-1 flip where the float model
    # hesitates says little; where it leads by >= 0.03, int8 must agree on at least 90 % of the clips.
    # Measured: overall agreement 0.86; above that margin 1.0 on an earlier machine and 0.936 (88 / 94) on
    # the Python 3.11 CI machine of stop 25, posteriors within 0.02 there and 0.115 here (same code; the
    # cause, tiny model or quantiser build, not isolated).
    agree = int8.argmax(1) == reference.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] >= 0.03
    print(
        f"\nint8 vs float on {len(clips)} synthetic test clips: top-1 agreement {agree.mean():.3f}, "
        f"{agree[decided].mean():.3f} on the {decided.sum()} with a margin >= 0.03, "
        f"posteriors within {np.abs(int8 - reference).max():.3f}"
    )
    assert decided.sum() >= 10 and agree[decided].mean() >= 0.9
    assert agree.mean() >= 0.75
    assert np.abs(int8 - reference).max() < 0.15


def test_eval_and_listen_take_model_path(
    int8_export: dict, tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    accuracies = {}
    for name, setting in (
        ("ckpt", f"ckpt_path={tiny_checkpoint['ckpt']}"),
        ("float", f"model_path={int8_export['path']}"),
        ("int8", f"model_path={int8_export['int8']['path']}"),
    ):
        result = run_cli(
            "eval",
            setting,
            f"paths.cache_dir={tiny_checkpoint['cache_dir']}",
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        accuracies[name] = float(
            re.search(r"^accuracy ([0-9.]+) on (\d+) clips", result.stdout, re.M).group(1)
        )
    # The same test draw (rebuilt from the export's metadata), scored the same way.
    assert accuracies["float"] == pytest.approx(accuracies["ckpt"], abs=1e-9)
    assert abs(accuracies["int8"] - accuracies["ckpt"]) <= 0.1

    testing = (tiny_checkpoint["data_root"] / "testing_list.txt").read_text().split()
    long_wav = tmp_path / "long.wav"
    import soundfile as sf

    audio = np.concatenate([read_audio_int16(tiny_checkpoint["data_root"] / rel) for rel in testing[:6]])
    sf.write(long_wav, audio, 16000)
    outputs = {}
    for name, model in (
        ("int8", f"model_path={int8_export['int8']['path']}"),
        ("ckpt", f"ckpt_path={tiny_checkpoint['ckpt']}"),  # and the incremental path through the CLI
    ):
        result = run_cli(
            "listen",
            model,
            f"input={long_wav}",
            "incremental=true" if name == "ckpt" else "incremental=auto",
            f"hydra.run.dir={tmp_path / ('listen_' + name)}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = re.search(
            r"detection\(s\) in ([0-9.]+) s of audio; (\d+) windows", result.stdout
        ).groups()
    assert outputs["int8"] == outputs["ckpt"]  # the same audio, the same windows


def test_bad_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Predictor.from_exported(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="not an exported model"):
        Predictor.from_exported(tmp_path / "model.ckpt")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot be read"):
        Predictor.from_exported(junk)


def test_fold_batchnorm_is_exact() -> None:
    """BatchNormalization -> Mul + Add by the folded scale / shift gives the same outputs."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from kws_lightning.quantize import fold_batchnorm

    rng = np.random.default_rng(0)
    params = {
        "gamma": rng.uniform(0.5, 2, 3),
        "beta": rng.normal(size=3),
        "mean": rng.normal(size=3),
        "var": rng.uniform(0.1, 3, 3),
    }
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", *params], ["y"], name="bn", epsilon=1e-3)],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)

    def run(model: onnx.ModelProto) -> np.ndarray:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    expected = run(proto)
    assert fold_batchnorm(proto, skip=set()) == 1
    assert [n.op_type for n in proto.graph.node] == ["Mul", "Add"]
    assert len(proto.graph.initializer) == 2  # the four BatchNorm vectors became two
    assert np.abs(run(proto) - expected).max() < 1e-5


def test_auto_calibration_keeps_the_method_closer_to_the_float_model(
    int8_export: dict, tiny_checkpoint: dict
) -> None:
    """The default (`auto`) calibrates with percentiles and with min / max, scores both against the float
    export on the checkpoint's validation clips and keeps the lower KL; the figures are recorded and the
    kept file reproduces them."""
    from kws_lightning.eval import datamodule_test_set, score
    from kws_lightning.quantize import fidelity_to

    proto = onnx.load(int8_export["int8"]["path"])
    info = json.loads({p.key: p.value for p in proto.metadata_props}["quantization"])
    scores = info["calibration_scores"]
    assert info["calibration_requested"] == "auto" and set(scores) == {"percentile", "minmax"}
    assert int8_export["int8"]["calibration"] == info["calibration"]
    kept = scores[info["calibration"]]
    assert kept["kl"] == min(f["kl"] for f in scores.values())
    assert scores["percentile"] != scores["minmax"]  # two different calibrations were scored
    # The kept file, scored as `eval` scores it, against the float export: the recorded figures.
    cache = str(tiny_checkpoint["cache_dir"])
    draws = {}
    for name, path in (("float", int8_export["path"]), ("int8", int8_export["int8"]["path"])):
        predictor = Predictor.from_exported(path)
        draws[name] = score(predictor, datamodule_test_set(predictor, cache, 64, 0, None, "validation"))
    (reference, targets), (probs, _) = draws["float"], draws["int8"]
    assert kept["clips"] == len(targets)
    assert (probs.argmax(axis=1) == targets).mean() == pytest.approx(kept["accuracy"], abs=1e-9)
    again = fidelity_to(reference.astype(np.float64), probs.astype(np.float64))
    assert again["kl"] == pytest.approx(kept["kl"], rel=1e-4) and again["agreement"] == kept["agreement"]


def test_pick_calibration_keeps_the_lowest_kl_first_listed_on_a_tie() -> None:
    from kws_lightning.quantize import fidelity_to, pick_calibration

    def figures(kl: float, accuracy: float) -> dict[str, float]:
        return {"kl": kl, "accuracy": accuracy, "agreement": 0.9, "clips": 100}

    # Accuracy is not the criterion (validation accuracy chose a calibration that did not carry over).
    closer_but_less_accurate = {"percentile": figures(0.022, 0.94), "minmax": figures(0.026, 0.96)}
    assert pick_calibration(closer_but_less_accurate) == "percentile"
    assert pick_calibration({"percentile": figures(0.09, 0.90), "minmax": figures(0.01, 0.88)}) == "minmax"
    assert pick_calibration({"percentile": figures(0.01, 0.9), "minmax": figures(0.01, 0.9)}) == "percentile"
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert fidelity_to(probs, probs) == pytest.approx({"kl": 0.0, "agreement": 1.0}, abs=1e-9)
    moved = fidelity_to(probs, probs[::-1])
    assert moved["agreement"] == 0.0 and moved["kl"] > 0.1


def activation_scales(proto: onnx.ModelProto) -> dict[str, float]:
    """Each quantised activation (a QuantizeLinear's input) -> its scale."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in proto.graph.initializer}
    return {
        n.input[0]: float(numpy_helper.to_array(initializers[n.input[1]]))
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[1] in initializers
    }


def test_a_named_calibration_is_used_as_asked(tiny_checkpoint: dict, tmp_path: Path) -> None:
    scales = {}
    for method in ("percentile", "minmax"):
        # 20 clips: not a multiple of the reader's batch of 16, which failed percentile (issue 29).
        exported = export_checkpoint(
            str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / method / "m.onnx", quantize="int8",
            calibration_clips=20, verify_clips=4, calibration=method,
            cache_dir=str(tiny_checkpoint["cache_dir"]),
        )  # fmt: skip
        proto = onnx.load(exported["int8"]["path"])
        info = json.loads({p.key: p.value for p in proto.metadata_props}["quantization"])
        assert info["calibration"] == info["calibration_requested"] == method
        assert info["calibration_scores"] == {}  # nothing compared
        scales[method] = activation_scales(proto)
    # The same activations quantised; min / max ranges are at least the percentile ones, and wider somewhere.
    assert scales["minmax"].keys() == scales["percentile"].keys()
    pairs = [(scales["minmax"][k], scales["percentile"][k]) for k in scales["minmax"]]
    assert all(wide >= narrow * (1 - 1e-6) for wide, narrow in pairs)
    assert any(wide > narrow * 1.01 for wide, narrow in pairs)


@pytest.mark.parametrize(("count", "batch"), [(400, 16), (20, 10), (150, 15), (17, 1), (3, 3)])
def test_calibration_batches_are_equal_for_any_clip_count(count: int, batch: int) -> None:
    """onnxruntime's percentile collector stacks the batches' activations: a shorter last batch made them
    ragged (calibration_clips=20 / 150 failed with "setting an array element with a sequence")."""
    waves = np.arange(count * 2, dtype=np.float32).reshape(count, 2)
    reader = WaveReader("waves", waves)
    batches = list(iter(reader.get_next, None))
    assert {len(b["waves"]) for b in batches} == {batch}
    np.testing.assert_array_equal(np.concatenate([b["waves"] for b in batches]), waves)


def test_an_unknown_calibration_is_refused_before_any_work(tiny_checkpoint: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"quantize_calibration='entropy': choose one of \['auto', "):
        export_checkpoint(
            str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / "m.onnx", quantize="int8", calibration="entropy"
        )
    assert not (tmp_path / "m.onnx").exists()


def test_zero_points_of_weights_are_dropped_losslessly(int8_export: dict, tmp_path: Path) -> None:
    """A weight DequantizeLinear's all-zero zero point is an optional input (default 0): dropping it
    changes no output and saves a byte per channel."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from kws_lightning.quantize import drop_zero_points

    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, size=(3, 6, 1, 1)).astype(np.int8)
    initializers = [
        numpy_helper.from_array(weights, "w_q"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, 3).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zero"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
            helper.make_node("Conv", ["x", "w"], ["y"]),
        ],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        initializers,
    )
    path = tmp_path / "dq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    x = rng.normal(size=(1, 6, 4, 4)).astype(np.float32)

    def run() -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    before = run()
    model = onnx.load(path)
    assert drop_zero_points(model) == 1
    onnx.save(model, path)
    proto = onnx.load(path)
    assert "w_zero" not in {i.name for i in proto.graph.initializer}
    assert np.array_equal(run(), before)
    # In a real export none is left (its weights are symmetric int8).
    exported = onnx.load(int8_export["int8"]["path"])
    names = {i.name for i in exported.graph.initializer}
    weight_dqs = [n for n in exported.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in names]
    assert weight_dqs and all(len(n.input) == 2 for n in weight_dqs)


def test_small_channel_weights_get_one_scale_per_tensor() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from kws_lightning.quantize import small_channel_weights

    convs = {"tap3": (4, 1, 3, 1), "tap4": (4, 1, 1, 4), "tap9": (4, 1, 3, 3), "pointwise": (4, 8, 1, 1)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", name], [f"y_{name}"], name=f"conv_{name}") for name in convs],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None) for name in convs],
        [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in convs.items()],
    )
    proto = helper.make_model(graph)
    assert small_channel_weights(proto, set()) == ["tap3", "tap4"]
    assert small_channel_weights(proto, {"conv_tap3"}) == ["tap4"]  # the front end is not quantised
