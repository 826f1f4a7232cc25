"""Room reverberation (conf/augment/default.yaml `reverb`): synthetic impulse responses with the drawn
RT60 and direct-to-reverberant ratio, applied in place of nothing when off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kws_lightning.data.augment import AugmentConfig, NoiseBank, prepare_batch
from kws_lightning.data.reverb import add_reverb, impulse_responses

RATE = 16000


def test_impulse_response_has_the_asked_drr_and_decay():
    torch.manual_seed(0)
    rt60, drr = 0.4, 6.0
    h = impulse_responses(torch.full((64,), rt60), torch.full((64,), drr), RATE)
    assert h.shape == (64, RATE)
    assert torch.equal(h[:, 0], torch.ones(64))
    tail_energy = h[:, 1:].square().sum(1)
    assert torch.allclose(10 * torch.log10(1.0 / tail_energy), torch.full((64,), drr), atol=1e-3)
    # Energy decay: Schroeder-style comparison of two 50 ms bands 200 ms apart, averaged over the draws.
    band = int(0.05 * RATE)
    first = h[:, 1 : 1 + band].square().sum(1).mean()
    later = h[:, 1 + int(0.2 * RATE) : 1 + int(0.2 * RATE) + band].square().sum(1).mean()
    expected_db = 60.0 * 0.2 / rt60  # 30 dB lower 200 ms on
    assert abs(10 * math.log10(first / later) - expected_db) < 1.5


def test_a_click_becomes_the_scaled_response_and_stays_in_place():
    torch.manual_seed(1)
    x = torch.zeros(3, RATE)
    x[:, 4000] = 0.5
    out = add_reverb(x, 1.0, [0.3, 0.3], [3.0, 3.0])
    assert out.shape == x.shape
    assert out[:, :4000].abs().max() < 1e-6  # causal: nothing before the click (FFT rounding only)
    assert torch.argmax(out.abs(), dim=1).tolist() == [4000] * 3  # the direct path is the peak
    assert torch.allclose(out.square().sum(1), x.square().sum(1), rtol=1e-4)  # energy kept
    tail = out[:, 4001:].square().sum(1) / out[:, 4000].square()
    # 3 dB DRR: the tail holds half the direct energy (the response's end fits inside the clip).
    assert torch.allclose(tail, torch.full((3,), 10 ** (-0.3)), rtol=0.02)


def test_speech_like_signal_is_smeared_in_time():
    torch.manual_seed(2)
    t = torch.arange(RATE) / RATE
    burst = torch.sin(2 * np.pi * 300 * t) * ((t > 0.3) & (t < 0.5))  # 200 ms tone, then silence
    x = 0.3 * burst.repeat(4, 1)
    out = add_reverb(x, 1.0, [0.6, 0.6], [0.0, 0.0])
    after = out[:, int(0.55 * RATE) : int(0.65 * RATE)].square().mean(1)
    during = out[:, int(0.35 * RATE) : int(0.45 * RATE)].square().mean(1)
    assert (after > 1e-3 * during).all()  # the room keeps ringing 50-150 ms after the tone stops
    assert (x[:, int(0.55 * RATE) :] == 0).all()


def test_off_leaves_the_batch_and_the_random_stream_alone():
    x = torch.rand(5, RATE) - 0.5
    torch.manual_seed(3)
    same = add_reverb(x, 0.0, [0.2, 0.8], [0.0, 15.0])
    after_off = torch.rand(1)
    torch.manual_seed(3)
    assert same is x and torch.equal(torch.rand(1), after_off)


def test_p_chooses_a_share_of_rows_and_keeps_the_others():
    torch.manual_seed(4)
    x = (torch.rand(400, 2000) - 0.5) * 0.2
    out = add_reverb(x, 0.5, [0.2, 0.8], [0.0, 15.0])
    changed = (out != x).any(dim=1)
    assert 0.4 < changed.double().mean() < 0.6
    assert torch.equal(out[~changed], x[~changed])
    assert out.abs().max() <= 1.0


def test_prepare_batch_reverberates_training_batches_only():
    torch.manual_seed(5)
    waves = torch.zeros(4, RATE, dtype=torch.int16)
    waves[:, 7000:9000] = (torch.randn(4, 2000) * 4000).to(torch.int16)
    lengths = torch.full((4,), RATE)
    silence = torch.zeros(4, dtype=torch.bool)
    bank = NoiseBank([])
    quiet = {"random_crop": False, "time_shift": {"enabled": False}, "noise": {"enabled": False}}
    dry = prepare_batch(waves, lengths, silence, bank, AugmentConfig.from_mapping(quiet), train=True)
    wet_cfg = AugmentConfig.from_mapping({**quiet, "reverb": {"p": 1.0}})
    wet = prepare_batch(waves, lengths, silence, bank, wet_cfg, train=True)
    assert (dry[:, 9100:] == 0).all() and (wet[:, 9100:].abs() > 0).any(dim=1).all()
    evaluated = prepare_batch(waves, lengths, silence, bank, wet_cfg, train=False)
    assert torch.equal(evaluated, dry)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"reverb": {"p": 1.5}}, "reverb.p"),
        ({"reverb": {"p": 0.5, "rt60_s": [0.8, 0.2]}}, "rt60_s must be"),
        ({"reverb": {"p": 0.5, "rt60_s": [0.0, 0.2]}}, "positive seconds"),
        ({"reverb": {"p": 0.5, "drr_db": [3.0]}}, "drr_db must be"),
        ({"reverb": {"room": "office"}}, "augment.reverb has unknown keys"),
    ],
)
def test_reverb_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_mapping(values)
