"""The GPU paths (trainer=gpu, mixed precision, DDP over NCCL, front end and augmentation on CUDA, exact
resume with CUDA random state, eval on a GPU vs the CPU). Skipped where torch sees no GPU: CI has none.
Run them on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import run_dir_of
from test_interrupts import QUIET, interrupt_at, run_train, weights
from training_helpers import check_ok

from kws_lightning.callbacks.exact_resume import RNG_STATES_KEY
from kws_lightning.checkpoints import load_checkpoint
from kws_lightning.data.augment import AugmentConfig, NoiseBank, prepare_batch
from kws_lightning.features import MFCC, LogMel, LogSpectrogram

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"
)

CUDA = torch.device("cuda")
# A tiny, fast training: narrow cnn_trad_pool2 on the session's synthetic speech.
TINY = [
    "experiment=quickstart",
    "model.n_feature_maps=16",
    "data.batch_size=32",
    "optimizer.lr=0.003",
    "scheduler.warmup_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
]


def _waves(batch: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(16000) / 16000
    tones = torch.sin(2 * np.pi * (200 + 1800 * torch.rand(batch, 1, generator=generator)) * t)
    return 0.3 * tones + 0.02 * torch.randn(batch, 16000, generator=generator)


@pytest.mark.parametrize("frontend_cls", [MFCC, LogMel, LogSpectrogram])
def test_front_end_on_the_gpu_matches_the_cpu_also_under_autocast(frontend_cls) -> None:
    waves = _waves()
    frontend = frontend_cls()
    expected = frontend(waves)
    on_gpu = frontend.to(CUDA)
    got = on_gpu(waves.to(CUDA))
    # cuFFT vs pocketfft, cuBLAS vs oneDNN: float32 rounding only.
    scale = expected.abs().max()
    assert torch.allclose(got.cpu(), expected, atol=2e-4 * scale, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            mixed = on_gpu(waves.to(CUDA))
        assert mixed.dtype == torch.float32  # autocast switched off inside: power spectra overflow fp16
        assert torch.allclose(mixed.cpu(), expected, atol=2e-4 * scale, rtol=1e-4)


def test_every_augmentation_runs_on_the_gpu_and_evaluation_windows_match_the_cpu() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([16000, 12000, 9000, 16000] * 4)
    waves = (_waves(16) * 20000).to(torch.int16)
    for row, length in enumerate(lengths.tolist()):
        waves[row, length:] = 0
    synth_silence = torch.zeros(16, dtype=torch.bool)
    synth_silence[-3:] = True
    noise = [0.05 * torch.randn(48000) for _ in range(3)]
    everything = AugmentConfig.from_mapping(
        {
            "noise": {"snr_db": [0.0, 20.0]},
            "white_noise": {"enabled": True},
            "silence": {"snr_db": [10.0, 30.0], "snr_p": 0.5},
            "speed": {"p": 1.0},
            "reverb": {"p": 1.0},
            "stream": {"offset_p": 1.0},
        }
    )
    bank = NoiseBank(noise).to(CUDA)
    out = prepare_batch(waves.to(CUDA), lengths.to(CUDA), synth_silence.to(CUDA), bank, everything, True)
    assert out.device.type == "cuda" and out.shape == (16, 16000)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0
    assert (out[~synth_silence.to(CUDA)].abs().amax(dim=1) > 0).all()  # silence may be digital zero
    cpu_eval = prepare_batch(waves, lengths, synth_silence, NoiseBank(noise), everything, False)
    gpu_eval = prepare_batch(
        waves.to(CUDA), lengths.to(CUDA), synth_silence.to(CUDA), bank, everything, False
    )
    assert torch.equal(gpu_eval.cpu(), cpu_eval)  # centred pad/crop: no arithmetic, bit-identical


def _metrics(stdout: str) -> dict:
    return json.loads((run_dir_of(stdout) / "metrics.json").read_text())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_training_on_the_gpu_learns_and_its_checkpoint_scores_the_same_on_the_cpu(
    tmp_path: Path, synthetic_overrides: list[str], run_cli: object, precision: str
) -> None:
    run_dir = tmp_path / "run"
    stdout = check_ok(
        run_cli(
            "train",
            *synthetic_overrides,
            *TINY,
            "trainer=gpu",
            f"trainer.precision={precision}",
            "trainer.max_epochs=20",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
    )
    test_acc = float(re.search(r"test/acc ([0-9.]+)", stdout).group(1))
    # Chance is 1/12; the same 20 epochs on the CPU in float32 reached 0.34.
    assert test_acc > 0.2, stdout[-2000:]
    ckpt = Path(re.search(r"^best checkpoint: (.+)$", stdout, re.M).group(1).strip())
    saved = load_checkpoint(ckpt)  # weights_only, opened on the CPU whatever device wrote it
    assert all(t.device.type == "cpu" for t in saved["state_dict"].values())
    scores = {}
    for device in ("cuda", "cpu"):
        result = run_cli(
            "eval",
            f"ckpt_path={ckpt}",
            f"device={device}",
            f"hydra.run.dir={tmp_path / device}",
            cwd=tmp_path,
        )
        scores[device] = _metrics(check_ok(result))
    # float32 inference on both: the same decisions (a near-tie may flip one clip), the training's own test.
    n_clips = scores["cpu"]["n_clips"]
    assert scores["cuda"]["n_clips"] == n_clips
    assert abs(scores["cuda"]["accuracy"] - scores["cpu"]["accuracy"]) <= 1.0 / n_clips + 1e-9
    assert abs(scores["cuda"]["accuracy"] - test_acc) <= 2.0 / n_clips + 1e-4


def test_best_recipe_trains_on_the_gpu_in_bf16(
    tmp_path: Path, synthetic_overrides: list[str], run_cli: object
) -> None:
    """TC-ResNet14-1.5 with EMA, SpecAugment, label smoothing and the cosine schedule (the `best` recipe)."""
    run_dir = tmp_path / "run"
    stdout = check_ok(
        run_cli(
            "train",
            *synthetic_overrides,
            "experiment=best",
            "trainer=gpu",
            "trainer.precision=bf16-mixed",
            "trainer.max_epochs=3",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "callbacks.tensorboard_extras=null",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
    )
    assert float(re.search(r"test/acc ([0-9.]+)", stdout).group(1)) > 1.0 / 12
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["hyper_parameters"]["config"]["trainer"]["precision"] == "bf16-mixed"
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_ddp_over_nccl_trains_on_one_gpu(
    tmp_path: Path, synthetic_overrides: list[str], run_cli: object
) -> None:
    stdout = check_ok(
        run_cli(
            "train",
            *synthetic_overrides,
            *TINY,
            "trainer=ddp",
            "trainer.devices=1",
            "trainer.max_epochs=2",
            f"hydra.run.dir={tmp_path / 'run'}",
            cwd=tmp_path,
        )
    )
    assert float(re.search(r"test/acc ([0-9.]+)", stdout).group(1)) > 0.0


def test_gpu_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, synthetic_overrides: list[str]
) -> None:
    """SpecAugment, mixup, noise and dropout draw from the CUDA generator here: a resume that lost its
    state would train on other masks and end far off (float32; cuDNN's atomics leave rounding only)."""
    common = [
        *synthetic_overrides,
        *QUIET,
        "trainer=gpu",
        "trainer.precision=32-true",
        "trainer.max_steps=30",
    ]
    check_ok(run_train(tmp_path, *common, f"hydra.run.dir={tmp_path / 'ref'}"))
    first = tmp_path / "logs" / "train" / "runs" / "first"
    stopped = interrupt_at(tmp_path, tmp_path / "probe", signal.SIGTERM, *common, f"hydra.run.dir={first}")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    (states,) = load_checkpoint(first / "checkpoints" / "last.ckpt")[RNG_STATES_KEY]
    assert "cuda" in states  # the CUDA generator's state is saved beside the CPU's
    check_ok(run_train(tmp_path, *common, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'resumed'}"))
    expected = weights(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    got = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst < 1e-3, f"resumed weights are {worst} away from the uninterrupted run's"
