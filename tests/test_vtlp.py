"""Vocal tract length perturbation (kws_lightning/vtlp.py): the warp's map, its filter-bank form against
warping the power spectrum directly, where a warped tone lands, and the module using it in training only."""

from __future__ import annotations

import math
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, compose_train, make_trainer

from kws_lightning.config_check import find_problems
from kws_lightning.features import MFCC, LogMel
from kws_lightning.labels import make_labels
from kws_lightning.module import KWSLightningModule
from kws_lightning.utils.instantiate import build_kws_model
from kws_lightning.vtlp import VTLP, source_bins, warp_filter_bank

SR = 16000
N_BINS = 241  # n_fft 480
LABELS = make_labels(["yes", "no"])


def test_the_map_scales_below_the_knee_and_keeps_both_ends() -> None:
    factors = torch.tensor([0.9, 1.0, 1.1], dtype=torch.float64)
    source = source_bins(factors, N_BINS, SR, boundary_hz=4800.0)
    bins = torch.arange(N_BINS, dtype=torch.float64)
    assert torch.equal(source[1], bins)  # alpha 1: every bin reads itself
    assert torch.all(source[:, 0] == 0) and torch.all(source[:, -1] == N_BINS - 1)  # DC and Nyquist stay
    assert torch.all(source[:, 1:] > source[:, :-1])  # monotone: no band folds over another
    hz = bins * (SR / 2) / (N_BINS - 1)
    for row, alpha in zip(source, factors.tolist(), strict=True):
        below = hz <= 4800.0 * min(alpha, 1.0)
        # output frequency f reads input f / alpha: alpha > 1 moves energy up
        torch.testing.assert_close(row[below], bins[below] / alpha, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="boundary_hz"):
        source_bins(factors, N_BINS, SR, boundary_hz=9000.0)


def test_the_warped_bank_equals_warping_each_power_spectrum_first() -> None:
    basis = MFCC().mel._mel_basis64  # (40, 241), float64
    generator = torch.Generator().manual_seed(3)
    factors = torch.tensor([0.9, 0.97, 1.0, 1.04, 1.1], dtype=torch.float64)
    power = torch.rand(5, N_BINS, 30, generator=generator, dtype=torch.float64)
    bank = warp_filter_bank(basis, factors, SR, 4800.0)
    assert bank.shape == (5, 40, N_BINS)
    assert torch.equal(bank[2], basis)  # alpha 1 leaves the bank bit for bit
    source = source_bins(factors, N_BINS, SR, 4800.0).numpy()
    grid = np.arange(N_BINS)
    for b in range(5):
        warped = np.stack([np.interp(source[b], grid, frame) for frame in power[b].T.numpy()], axis=1)
        np.testing.assert_allclose(
            (bank[b] @ power[b]).numpy(), basis.numpy() @ warped, rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("alpha", [0.9, 1.1])
def test_a_warped_tone_lands_in_the_band_of_the_tone_alpha_times_higher(alpha: float) -> None:
    t = np.arange(SR) / SR
    frontend = LogMel(normalize="none").double()

    def peak_band(wave: np.ndarray, warp: VTLP | None) -> int:
        feats = frontend(torch.from_numpy(wave).unsqueeze(0), bank_warp=warp)  # (1, 1, T, 40)
        return int(feats[0, 0].mean(0).argmax())

    warp = VTLP(p=1.0, min_factor=alpha, max_factor=alpha)
    for f0 in (1000.0, 1800.0, 3000.0):  # where a 10 % move is over a band: bands ~60-170 Hz apart
        tone = np.sin(2 * math.pi * f0 * t)
        moved = np.sin(2 * math.pi * alpha * f0 * t)
        assert peak_band(tone, warp) == peak_band(moved, None) != peak_band(tone, None)
    # and on the same scale as librosa's bank: the band of alpha * f0 in its own Slaney mel scale
    centres = librosa.mel_frequencies(n_mels=42, fmin=20.0, fmax=4000.0)[1:-1]
    assert abs(centres[peak_band(np.sin(2 * math.pi * 1000.0 * t), warp)] - alpha * 1000.0) < 60.0


def test_factors_follow_p_and_the_range() -> None:
    torch.manual_seed(0)
    assert torch.all(VTLP(p=0.0).factors(1000, torch.device("cpu")) == 1.0)
    drawn = VTLP(p=1.0, min_factor=0.9, max_factor=1.1).factors(4000, torch.device("cpu"))
    assert drawn.min() >= 0.9 and drawn.max() <= 1.1 and 0.0 < drawn.std() and abs(drawn.mean() - 1.0) < 0.01
    half = VTLP(p=0.5).factors(4000, torch.device("cpu"))
    assert 0.45 < (half == 1.0).float().mean() < 0.55
    for bad in (dict(p=1.5), dict(min_factor=1.1, max_factor=0.9), dict(min_factor=0.0), dict(boundary_hz=0)):
        with pytest.raises(ValueError, match="vtlp"):
            VTLP(**bad)


class CountingVTLP(VTLP):
    def __init__(self) -> None:
        super().__init__(p=1.0)
        self.batches: list[int] = []

    def __call__(self, basis: torch.Tensor, batch: int, sample_rate: int) -> torch.Tensor:
        self.batches.append(batch)
        return super().__call__(basis, batch, sample_rate)


def test_the_module_warps_in_training_steps_only(tmp_path: Path) -> None:
    cfg = compose_train("feature=mfcc", "model=cnn_trad_pool2", "model.n_feature_maps=4")
    model = build_kws_model(cfg.feature, cfg.model, num_classes=len(LABELS))
    vtlp = CountingVTLP()
    module = KWSLightningModule(model, LABELS, optimizer=instantiate(cfg.optimizer), vtlp=vtlp)
    batch = (0.1 * torch.randn(4, 16000), torch.tensor([0, 1, 2, 3]))
    loader = DataLoader(RepeatBatch(batch, 2), batch_size=None)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(
        module, train_dataloaders=loader, val_dataloaders=DataLoader(RepeatBatch(batch, 1), batch_size=None)
    )
    assert vtlp.batches == [4, 4]  # two training steps; validation runs the plain model
    frontend = module.model.frontend
    with torch.no_grad():
        plain = frontend(batch[0])
        warped = frontend(batch[0], bank_warp=VTLP(min_factor=1.1, max_factor=1.1))
    assert torch.equal(module.model.frontend(batch[0]), plain) and not torch.allclose(plain, warped)
    # a front end without a mel filter bank cannot be warped: refused up front, naming the fix
    spec_model = build_kws_model(compose_train("feature=logspec").feature, cfg.model, len(LABELS))
    with pytest.raises(ValueError, match="vtlp=none"):
        KWSLightningModule(spec_model, LABELS, vtlp=VTLP())


def test_the_config_group_composes_and_bad_values_are_refused() -> None:
    cfg = compose_train("vtlp=default")
    assert isinstance(instantiate(cfg.vtlp), VTLP) and not compose_train().vtlp
    problems = {
        p.key for p in find_problems(compose_train("vtlp=default", "vtlp.p=1.5", "vtlp.min_factor=-1"))
    }
    assert {"vtlp.p", "vtlp.min_factor"} <= problems
