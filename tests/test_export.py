"""Export: the matmul-DFT front end path, ONNX (onnxruntime) and TorchScript against the PyTorch model."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.export import ExportedModel, export_checkpoint, load_exported, read_metadata
from kws_lightning.features import MFCC, LogMel, LogSpectrogram, export_friendly
from kws_lightning.inference import Predictor

FRONT_ENDS = {
    "mfcc": MFCC,
    "logmel": LogMel,
    "logspec": LogSpectrogram,
    "mfcc_reflect": lambda: MFCC(pad_mode="reflect"),
}


def speech_batch(data_root: Path, count: int = 12) -> np.ndarray:
    """`count` clips (real WAV files of the synthetic set, several words), centred in 1 s, float32."""
    testing = (data_root / "testing_list.txt").read_text().split()
    waves = np.zeros((count, 16000), np.float32)
    for row, i in enumerate(np.linspace(0, len(testing) - 1, count).astype(int)):
        clip = read_audio_int16(data_root / testing[i])[:16000]
        start = (16000 - len(clip)) // 2
        waves[row, start : start + len(clip)] = clip / 32768.0
    return waves


@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_matmul_dft_path_matches_the_fft_path(name: str, tiny_checkpoint: dict) -> None:
    waves = torch.from_numpy(speech_batch(tiny_checkpoint["data_root"]))
    fft = FRONT_ENDS[name]()
    matmul = export_friendly(copy.deepcopy(fft))
    with torch.no_grad():
        # float64: the two paths are the same arithmetic up to rounding.
        ref64 = copy.deepcopy(fft).double()(waves.double())
        assert (export_friendly(copy.deepcopy(fft)).double()(waves.double()) - ref64).abs().max() < 1e-9
        # float32: the matmul path is as close to the float64 truth as the FFT path is (measured <= 3.3e-4
        # on speech, the FFT path 3.5e-4 / 8.9e-4 / 2.7e-4 for mfcc / logmel / logspec).
        assert (matmul(waves).double() - ref64).abs().max() < 1e-3
    assert not fft.mel.matmul_dft if hasattr(fft, "mel") else not fft.matmul_dft  # the copy was switched
    assert export_friendly(matmul, enabled=False) is matmul
    assert not any(getattr(m, "matmul_dft", False) for m in matmul.modules())


def test_power_spectrum_of_the_matmul_path_to_1e_4(tiny_checkpoint: dict) -> None:
    waves = torch.from_numpy(speech_batch(tiny_checkpoint["data_root"]))
    mel = MFCC().mel
    with torch.no_grad():
        fft = mel(waves)
        matmul = export_friendly(copy.deepcopy(mel))(waves)
    peak = fft.amax(dim=(1, 2), keepdim=True)
    assert ((matmul - fft).abs() / peak).max() < 1e-4  # relative to each clip's largest mel power


class AllFrontEnds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList([MFCC(), LogMel(), LogSpectrogram()])

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(waves).flatten(1) for part in self.parts], dim=1)


def test_front_ends_in_onnxruntime(tiny_checkpoint: dict, tmp_path: Path) -> None:
    """Exported alone, the front ends match torch: a regression test for ORT's inaccurate DFT and the
    exporter dropping `x + 1e-10` (LogSpectrogram's eps) as a no-op."""
    import onnxruntime

    module = export_friendly(AllFrontEnds()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (torch.zeros(2, 16000),),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    program.save(str(tmp_path / "front_ends.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "front_ends.onnx"))
    waves = speech_batch(tiny_checkpoint["data_root"], 5)
    got = session.run(None, {session.get_inputs()[0].name: waves})[0]
    with torch.no_grad():
        expected = AllFrontEnds()(torch.from_numpy(waves)).numpy()
    assert np.abs(got - expected).max() < 1e-3  # measured ~4e-4: float32 rounding in log features


def test_onnx_export_cli(tiny_checkpoint: dict, run_cli: object, tmp_path: Path) -> None:
    import onnxruntime

    out = tmp_path / "kws.onnx"
    result = run_cli(
        "export",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        "format=onnx",
        f"out={out}",
        f"verify_input={tiny_checkpoint['data_root']}",
        "verify_clips=16",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(
        r"verified on 16 clips from .*: max \|diff\| \S+ .*same predictions: True", result.stdout
    )

    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    metadata = read_metadata(out, "onnx")
    assert metadata["labels"] == predictor.labels and metadata["output"] == "logits"
    assert (metadata["sample_rate"], metadata["clip_samples"]) == (16000, 16000)
    session = onnxruntime.InferenceSession(str(out))
    (waves_input,) = session.get_inputs()
    assert waves_input.shape[1] == 16000 and not isinstance(waves_input.shape[0], int)  # dynamic batch

    waves = speech_batch(tiny_checkpoint["data_root"], 7)
    with torch.no_grad():
        logits = predictor.models[0](torch.from_numpy(waves)).numpy()
    run = load_exported(out, "onnx")
    for batch in (waves, waves[:1]):
        got = run(batch)
        assert got.shape == (len(batch), len(predictor.labels))
        assert np.abs(got - logits[: len(batch)]).max() < 1e-3  # measured ~5e-6
        assert (got.argmax(1) == logits[: len(batch)].argmax(1)).all()


def test_torchscript_export_of_posteriors(tiny_checkpoint: dict, tmp_path: Path) -> None:
    result = export_checkpoint(
        str(tiny_checkpoint["ckpt"]), "torchscript", tmp_path / "kws.pt", output="probs", verify_clips=10
    )
    assert result["same_predictions"] and result["max_abs_diff"] < 1e-5
    assert result["verified_on"] == "10 test signals"
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    assert read_metadata(tmp_path / "kws.pt", "torchscript")["labels"] == predictor.labels
    waves = speech_batch(tiny_checkpoint["data_root"], 5)
    probs = load_exported(tmp_path / "kws.pt", "torchscript")(waves)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, predictor.posteriors(torch.from_numpy(waves)).numpy(), atol=1e-5)


def test_bad_format_and_output_are_clear_errors(tiny_checkpoint: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"format='tflite' unknown; valid: \['onnx', 'torchscript'\]"):
        export_checkpoint(str(tiny_checkpoint["ckpt"]), "tflite", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match=r"output='prob' unknown; valid: \['logits', 'probs'\]"):
        ExportedModel(nn.Identity(), "prob")


def test_a_rejected_export_writes_nothing_at_out(
    tiny_checkpoint: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is written beside `out` and renamed only once verified (issue 29: a failed export left its
    file at `out`); here the exported model's outputs are made to differ from PyTorch's by 0.01."""
    import kws_lightning.export as export_module

    real_load = export_module.load_exported
    monkeypatch.setattr(
        export_module, "load_exported", lambda path, fmt: lambda waves: real_load(path, fmt)(waves) + 0.01
    )
    out = tmp_path / "kws.pt"
    with pytest.raises(
        RuntimeError, match=r"max \|diff\| 0\.01 > tolerance 0\.001.*nothing written to .*kws\.pt"
    ):
        export_checkpoint(str(tiny_checkpoint["ckpt"]), "torchscript", out, verify_clips=4, tolerance=1e-3)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_failed_int8_step_keeps_the_verified_float_file_only(
    tiny_checkpoint: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kws_lightning.quantize as quantize

    def broken(float_path: Path, out: Path, *args: object) -> None:
        Path(out).write_bytes(b"half a model")
        raise RuntimeError("quantiser crashed")

    monkeypatch.setattr(quantize, "calibration_waves", lambda *a, **k: np.zeros((4, 16000), np.float32))
    monkeypatch.setattr(quantize, "quantize_int8", broken)
    with pytest.raises(RuntimeError, match="quantiser crashed"):
        export_checkpoint(
            str(tiny_checkpoint["ckpt"]), "onnx", tmp_path / "kws.onnx", verify_clips=4,
            quantize="int8", calibration="minmax", tolerance=1e-3,
        )  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["kws.onnx"]
