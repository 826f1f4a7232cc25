"""Speed perturbation (conf/augment/default.yaml `speed`): a clip resampled by its factor changes its
length and its pitch by that factor; off, or at factor 1, clips are untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kws_lightning.data.augment import INT16_SCALE, AugmentConfig, SpeedPerturb, speed_perturb

RATE = 16000


def tone(freq: float, samples: int, rows: int = 1) -> torch.Tensor:
    t = torch.arange(samples, dtype=torch.float64) / RATE
    wave = (0.5 * INT16_SCALE * torch.sin(2 * np.pi * freq * t)).round().to(torch.int16)
    return wave.repeat(rows, 1)


def peak_frequency(row: torch.Tensor, length: int) -> float:
    spectrum = np.abs(np.fft.rfft(row[:length].double().numpy() * np.hanning(length)))
    return float(np.argmax(spectrum)) * RATE / length


@pytest.mark.parametrize("factor", [0.9, 1.07, 1.1])
def test_a_tone_moves_by_the_factor_and_the_clip_shortens_by_it(factor):
    waves = torch.zeros(2, 16000, dtype=torch.int16)
    waves[:, :12000] = tone(440.0, 12000, rows=2)
    lengths = torch.tensor([12000, 12000])
    out, new_lengths = speed_perturb(
        waves, lengths, SpeedPerturb(p=1.0, min_factor=factor, max_factor=factor)
    )
    assert out.dtype == torch.int16
    expected = int(np.ceil(12000 / factor))
    assert new_lengths.tolist() == [expected, expected]
    assert (out[:, expected:] == 0).all() and (out[:, expected - 1] != 0).any()
    found = peak_frequency(out[0], expected)
    assert abs(found - 440.0 * factor) < 2.0  # FFT bins of ~1.3 Hz at this length
    assert out.abs().max() <= waves.abs().max()  # interpolation never overshoots


def test_unit_factor_and_p_zero_leave_clips_untouched():
    torch.manual_seed(0)
    waves = (torch.randn(8, 16000) * 3000).to(torch.int16)
    lengths = torch.randint(8000, 16001, (8,))
    for row, n in enumerate(lengths.tolist()):
        waves[row, n:] = 0
    same, same_lengths = speed_perturb(waves, lengths, SpeedPerturb(p=1.0, min_factor=1.0, max_factor=1.0))
    assert torch.equal(same[:, :16000], waves) and torch.equal(same_lengths, lengths)
    kept, kept_lengths = speed_perturb(waves, lengths, SpeedPerturb(p=0.0))
    assert torch.equal(kept[:, :16000], waves) and torch.equal(kept_lengths, lengths)


def test_factors_are_drawn_per_clip_within_the_range_with_probability_p():
    torch.manual_seed(1)
    rows = 400
    waves = tone(440.0, 16000, rows=rows)
    lengths = torch.full((rows,), 16000)
    _, new_lengths = speed_perturb(waves, lengths, SpeedPerturb(p=0.5, min_factor=0.9, max_factor=1.1))
    factors = 16000 / new_lengths.double()
    changed = new_lengths != 16000
    assert 0.4 < changed.double().mean() < 0.6
    assert factors.min() > 0.899 and factors.max() < 1.101
    assert factors[changed].min() < 0.92 and factors[changed].max() > 1.08  # spread over the range


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"speed": {"p": 2.0}}, "speed.p"),
        ({"speed": {"p": 0.5, "min_factor": 1.2, "max_factor": 1.1}}, "0 < min_factor <= max_factor"),
        ({"speed": {"rate": 1.1}}, "augment.speed has unknown keys"),
    ],
)
def test_speed_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_mapping(values)
