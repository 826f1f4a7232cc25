"""Device-side batch transforms: exact placement, shift, noise gain bounds, silence, config errors."""

import pytest
import torch

from kws_lightning.data.augment import (
    AugmentConfig,
    NoiseBank,
    SilenceSynth,
    add_white_noise,
    center_starts,
    mix_noise,
    prepare_batch,
    random_starts,
    shift_amounts,
    synthesize_silence,
    window,
)


def ramp_batch(lengths, width=None):
    width = width or max(lengths)
    waves = torch.zeros(len(lengths), width, dtype=torch.int16)
    for row, n in enumerate(lengths):
        waves[row, :n] = torch.arange(1, n + 1, dtype=torch.int16)
    return waves, torch.tensor(lengths)


def test_centre_pad_and_crop_are_exact():
    waves, lengths = ramp_batch([6, 10, 13])
    out = window(waves, center_starts(lengths, 10), 10)
    assert out[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 0, 0]
    assert out[1].tolist() == list(range(1, 11))
    assert out[2].tolist() == list(range(2, 12))  # 13 → 10: floor((13-10)/2) = 1 dropped at the start


def test_random_placement_keeps_clip_contiguous_and_covers_range():
    torch.manual_seed(0)
    waves, lengths = ramp_batch([4] * 2000)
    starts = random_starts(lengths, 10)
    assert starts.min() == -6 and starts.max() == 0  # every offset that keeps the clip inside
    out = window(waves, starts, 10)
    for row in out[:50]:
        nonzero = row[row != 0].tolist()
        assert nonzero == [1, 2, 3, 4]
    long_waves, long_lengths = ramp_batch([15] * 2000)
    crops = random_starts(long_lengths, 10)
    assert crops.min() == 0 and crops.max() == 5


def test_time_shift_bounds_and_probability():
    torch.manual_seed(0)
    x = torch.arange(1, 101, dtype=torch.float32).repeat(4000, 1)
    shifted = window(x, -shift_amounts(len(x), 20, 0.5, x.device), x.shape[1])
    unchanged = (shifted == x).all(dim=1)
    assert 0.45 < unchanged.float().mean() < 0.56  # p=0.5, plus the 1/41 zero shifts
    first_nonzero = shifted[~unchanged].ne(0).float().argmax(dim=1)
    shift_amount = shifted[~unchanged].max(dim=1).values  # right shift drops the tail
    assert first_nonzero.max() <= 20 and shift_amount.min() >= 80
    assert torch.equal(window(x, -shift_amounts(len(x), 0, 0.5, x.device), x.shape[1]), x)


def test_train_shift_is_zero_filled_and_keeps_short_clips_whole():
    torch.manual_seed(0)
    waves, lengths = ramp_batch([6000] * 500, width=16000)
    bank = NoiseBank([torch.zeros(20000, dtype=torch.int16)])
    cfg = AugmentConfig.from_mapping({"time_shift": {"p": 1.0}, "noise": {"enabled": False}})
    out = prepare_batch(waves, lengths, torch.zeros(500, dtype=torch.bool), bank, cfg, train=True)
    onsets = (out != 0).float().argmax(dim=1)
    for row in out[:200]:
        visible = (row[row != 0] * 32768).round()
        # One contiguous run of the clip (never wrapped around): cut only where it meets an edge.
        assert (visible.diff() == 1).all()
        assert visible[0] == 1 or row[0] != 0
        assert visible[-1] == 6000 or row[-1] != 0
    # Placement (up to 10000 samples) plus a shift of up to 3200 either way.
    assert onsets.max() > 10000 and (out[:, :100] != 0).any(dim=1).any()


def test_noise_mix_gain_bounds_and_clipping():
    torch.manual_seed(0)
    noise = NoiseBank([torch.full((5000,), 16384, dtype=torch.int16)], slice_length=100)  # constant 0.5
    x = torch.zeros(4000, 100)
    mixed = mix_noise(x, noise, max_gain=0.2, p=0.5)
    gains = mixed[:, 0] / 0.5
    assert (mixed == mixed[:, :1]).all()
    assert 0.45 < (gains == 0).float().mean() < 0.55
    assert gains.max() <= 0.2 + 1e-6 and gains[gains > 0].min() < 0.01
    loud = mix_noise(torch.full((10, 100), 0.95), noise, max_gain=0.2, p=1.0)
    assert loud.max() <= 1.0


def test_noise_slices_stay_inside_one_recording():
    torch.manual_seed(0)
    bank = NoiseBank(
        [torch.full((300,), 100, dtype=torch.int16), torch.full((50,), -100, dtype=torch.int16)],
        slice_length=120,
    )
    slices = bank.slices(500) * 32768
    for row in slices:
        values = set(row.round().tolist())
        assert values in ({100.0}, {-100.0, 0.0})  # short recording zero padded, never mixed


def test_silence_is_noise_at_random_gain_or_zero():
    torch.manual_seed(0)
    bank = NoiseBank([torch.full((20000,), 16384, dtype=torch.int16)], slice_length=100)
    silence = synthesize_silence(2000, bank, SilenceSynth(max_gain=1.0, p_zero=0.1))
    zero = (silence == 0).all(dim=1).float().mean()
    assert 0.07 < zero < 0.13
    assert silence.max() <= 0.5 + 1e-6


def test_prepare_batch_train_vs_eval():
    torch.manual_seed(0)
    waves, lengths = ramp_batch([8000, 16000, 16000])
    synth = torch.tensor([False, False, True])
    bank = NoiseBank([torch.full((40000,), 3000, dtype=torch.int16)])
    cfg = AugmentConfig.from_mapping({"noise": {"p": 1.0}, "silence": {"p_zero": 0.0}})
    eval_out = prepare_batch(waves, lengths, synth, bank, cfg, train=False)
    assert eval_out.shape == (3, 16000) and eval_out.dtype == torch.float32
    assert eval_out[0, :4000].abs().sum() == 0 and eval_out[0, 4000] == 1 / 32768
    train_out = prepare_batch(waves, lengths, synth, bank, cfg, train=True)
    assert not torch.equal(train_out[1], eval_out[1])
    noise_level = 3000 / 32768
    assert torch.allclose(train_out[2], train_out[2, :1].expand(16000), atol=1e-6)  # silence = flat noise
    assert 0 < train_out[2, 0] <= noise_level


def test_augment_config_rejects_typos_and_switches_off():
    with pytest.raises(ValueError, match="valid keys"):
        AugmentConfig.from_mapping({"time_shfit": {}})
    with pytest.raises(ValueError, match="augment.noise has unknown keys"):
        AugmentConfig.from_mapping({"noise": {"gain": 0.1}})
    off = AugmentConfig.from_mapping(
        {"random_crop": False, "time_shift": {"enabled": False}, "noise": {"enabled": False}}
    )
    waves, lengths = ramp_batch([16000, 12000])
    bank = NoiseBank([torch.full((40000,), 3000, dtype=torch.int16)])
    synth = torch.tensor([False, False])
    train = prepare_batch(waves, lengths, synth, bank, off, train=True)
    assert torch.equal(train, prepare_batch(waves, lengths, synth, bank, off, train=False))


def test_white_noise_level_is_drawn_in_the_db_range():
    torch.manual_seed(0)
    x = torch.zeros(4000, 16000)
    noisy = add_white_noise(x, min_db=-90.0, max_db=-46.0, p=1.0)
    # 16000 samples estimate each clip's standard deviation to ~0.5 %, i.e. its level to ~0.05 dB.
    level_db = 20 * torch.log10(noisy.square().mean(dim=1).sqrt())
    assert level_db.min() > -90.2 and level_db.max() < -45.8
    assert level_db.min() < -89.0 and level_db.max() > -47.0  # the whole range is used ...
    assert abs(level_db.mean() + 68.0) < 1.0  # ... uniformly in dB: mean (-90 - 46) / 2
    assert 0.2 < (level_db < -79.0).float().mean() < 0.3  # a quarter below -79 dB
    # Gaussian, zero mean: about 68 % of samples within one standard deviation.
    row = noisy[0] / noisy[0].std()
    assert abs(row.mean()) < 0.05 and 0.66 < (row.abs() < 1).float().mean() < 0.70


def test_white_noise_probability_and_clipping():
    torch.manual_seed(0)
    noisy = add_white_noise(torch.zeros(2000, 100), min_db=-20.0, max_db=-20.0, p=0.3)
    touched = (noisy != 0).any(dim=1).float().mean()
    assert 0.25 < touched < 0.35
    assert add_white_noise(torch.full((10, 100), 0.99), -10.0, -10.0, p=1.0).max() <= 1.0
    x = torch.randn(4, 100)
    assert add_white_noise(x, -90.0, -46.0, p=0.0) is x


def test_white_noise_in_prepare_batch_after_noise_mix_not_on_silence():
    waves, lengths = ramp_batch([16000, 16000, 16000])
    synth = torch.tensor([False, False, True])
    bank = NoiseBank([torch.zeros(40000, dtype=torch.int16)])  # noise mix and silence add exact zeros
    base = {"random_crop": False, "time_shift": {"enabled": False}, "silence": {"p_zero": 0.0}}
    off = AugmentConfig.from_mapping(base)
    assert off.white_noise.enabled is False  # the default: batches as before
    torch.manual_seed(0)
    plain = prepare_batch(waves, lengths, synth, bank, off, train=True)
    torch.manual_seed(0)
    assert torch.equal(plain, prepare_batch(waves, lengths, synth, bank, off, train=True))
    on = AugmentConfig.from_mapping({**base, "white_noise": {"enabled": True, "min_db": -40, "max_db": -40}})
    noisy = prepare_batch(waves, lengths, synth, bank, on, train=True)
    added = noisy[:2] - plain[:2]
    assert torch.allclose(added.std(dim=1), torch.full((2,), 0.01), rtol=0.03)  # -40 dB = 0.01
    assert torch.equal(noisy[2], torch.zeros(16000))  # silence rows are synthesised after the noise
    evaluation = prepare_batch(waves, lengths, synth, bank, on, train=False)
    assert torch.equal(evaluation, prepare_batch(waves, lengths, synth, bank, off, train=False))  # train only


@pytest.mark.parametrize(
    ("white_noise", "message"),
    [
        ({"level": -50}, "augment.white_noise has unknown keys"),
        ({"min_db": -40, "max_db": -50}, "min_db"),
        ({"p": 2.0}, "white_noise.p"),
    ],
)
def test_white_noise_config_errors(white_noise, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_mapping({"white_noise": white_noise})
