"""Training for streams (issue 14 part 2, conf/experiment/best_stream.yaml): keyword halves relabelled
unknown, noise at an SNR re the clip's speech level, speech placed anywhere in the window, silence at a
stream's level; and with every option off, batches bit-identical to the input path before it existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from training_helpers import check_ok, compose_train

from kws_lightning.data.augment import (
    INT16_SCALE,
    AugmentConfig,
    NoiseBank,
    add_white_noise,
    center_starts,
    cut_keyword_halves,
    mix_noise,
    prepare_batch,
    random_starts,
    shift_amounts,
    speech_stats,
    synthesize_silence,
    window,
)
from kws_lightning.labels import UNKNOWN_INDEX
from kws_lightning.stream_bench.streams import speech_extent

KEYWORD = UNKNOWN_INDEX + 1  # the first keyword's target


def burst_batch(spans: list[tuple[int, int]], amplitude: float = 0.1, width: int = 16000, seed: int = 0):
    """int16 rows of zero with a noise burst (the "word") at each row's [start, end) samples."""
    generator = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(spans), width, dtype=torch.int16)
    for row, (start, end) in enumerate(spans):
        burst = torch.randn(end - start, generator=generator) * amplitude * INT16_SCALE
        waves[row, start:end] = burst.round().clamp(-32768, 32767).to(torch.int16)
    return waves, torch.full((len(spans),), width)


def white_bank(seconds: float = 5.0, level: float = 0.2) -> NoiseBank:
    generator = torch.Generator().manual_seed(1)
    noise = (torch.randn(int(seconds * 16000), generator=generator) * level * INT16_SCALE).to(torch.int16)
    return NoiseBank([noise])


def old_prepare_batch(waves, lengths, synth_silence, bank, cfg, train):
    """The input path as it was before the stream options (commit 631ac86's prepare_batch), for the
    bit-identity check: the new code must draw the same random numbers in the same order when they are off."""
    out_len = bank.slice_length
    if not train:
        return window(waves, center_starts(lengths, out_len), out_len).float().div_(INT16_SCALE)
    starts = random_starts(lengths, out_len) if cfg.random_crop else center_starts(lengths, out_len)
    if cfg.time_shift.enabled:
        max_shift = int(cfg.time_shift.max_fraction * out_len)
        starts = starts - shift_amounts(len(waves), max_shift, cfg.time_shift.p, waves.device)
    x = window(waves, starts, out_len).float().div_(INT16_SCALE)
    if cfg.noise.enabled:
        x = mix_noise(x, bank, cfg.noise.max_gain, cfg.noise.p)
    if cfg.white_noise.enabled:
        x = add_white_noise(x, cfg.white_noise.min_db, cfg.white_noise.max_db, cfg.white_noise.p)
    if synth_silence.any():
        rows = synth_silence.nonzero().squeeze(1)
        x[rows] = synthesize_silence(len(rows), bank, cfg.silence)
    return x


def test_speech_stats_are_the_streams_level_measure():
    """Same first / last sample and active RMS as stream_bench.streams.speech_extent (the streams' SNR)."""
    spans = [(3000, 9000), (0, 16000), (8000, 8800), (12345, 15999)]
    waves, lengths = burst_batch(spans, seed=3)
    waves[1, :4000] //= 100  # a quiet lead-in: more than 25 dB down, not speech
    lengths = torch.tensor([16000, 16000, 16000, 15000])  # a partial last frame is left out, as there
    waves[3, 15000:] = 0
    stats = speech_stats(waves, lengths)
    for row in range(len(spans)):
        first, last, rms = speech_extent(waves[row, : lengths[row]].numpy())
        assert (stats.first[row].item(), stats.last[row].item()) == (first, last)
        assert stats.rms[row].item() == pytest.approx(rms, rel=1e-5)
    assert stats.first[1] == 4000  # the quiet part is not counted
    empty = speech_stats(torch.zeros(2, 16000, dtype=torch.int16), torch.tensor([0, 16000]))
    assert empty.rms.tolist() == [0.0, 0.0]


def test_keyword_halves_are_relabelled_unknown_and_are_halves_of_the_speech():
    torch.manual_seed(0)
    count = 400
    # A "word" off-centre (9000..15000) with a loud vowel (9000..11400, 3x the amplitude): its energy
    # midpoint is at 10400, not the extent's middle (12000) and not sample 8000. A square wave of constant
    # power per part, so the halves' energies are exact.
    waves, lengths = burst_batch([(9000, 15000)] * count)
    waves = waves.sign() * 3000
    waves[:, 9000:11400] *= 3
    energy = waves.float().pow(2)
    cut_at = 9000 + 2400 * (energy[0].sum() / 2) / energy[0, 9000:11400].sum()  # inside the vowel
    assert abs(cut_at - 10400) < 1
    targets = torch.tensor([0, UNKNOWN_INDEX, KEYWORD, KEYWORD + 3] * (count // 4))
    cut, relabelled = cut_keyword_halves(waves, lengths, targets, 1.0, UNKNOWN_INDEX, KEYWORD)
    keyword = targets >= KEYWORD
    assert (relabelled[keyword] == UNKNOWN_INDEX).all()
    assert torch.equal(relabelled[~keyword], targets[~keyword])
    assert torch.equal(cut[~keyword], waves[~keyword])
    assert targets[2] == KEYWORD  # the inputs are left as they were
    halves = {"first": 0, "second": 0}
    frame_share = energy[0, 9000:9160].sum() / energy[0].sum()  # one loud 10 ms frame's share
    for row in keyword.nonzero().squeeze(1).tolist():
        kept = cut[row].float().pow(2)
        share = kept.sum() / energy[row].sum()
        assert abs(share - 0.5) <= frame_share  # half the speech's energy, to a frame (the cut's grid)
        first_half = kept[:10400].sum() > kept[10400:].sum()
        halves["first" if first_half else "second"] += 1
        if first_half:
            assert torch.equal(cut[row, :10200], waves[row, :10200]) and (cut[row, 10600:] == 0).all()
        else:
            assert torch.equal(cut[row, 10600:], waves[row, 10600:]) and (cut[row, :10200] == 0).all()
    assert min(halves.values()) > 0.4 * keyword.sum()  # a fair coin between the halves
    torch.manual_seed(0)
    _, some = cut_keyword_halves(waves, lengths, targets, 0.3, UNKNOWN_INDEX, KEYWORD)
    assert 0.2 < (some[keyword] == UNKNOWN_INDEX).float().mean() < 0.4
    same_waves, same_targets = cut_keyword_halves(waves, lengths, targets, 0.0, UNKNOWN_INDEX, KEYWORD)
    assert same_waves is waves and same_targets is targets


def quiet_path(**extra) -> AugmentConfig:
    """Centred clips, no shift: what comes out minus what went in is exactly the added noise."""
    return AugmentConfig.from_mapping({"random_crop": False, "time_shift": {"enabled": False}, **extra})


def test_noise_is_mixed_at_the_requested_snr_re_the_clips_speech():
    torch.manual_seed(0)
    levels = [0.02, 0.05, 0.2]  # speakers at their own recorded levels
    spans = [(4000, 12000)] * 300
    waves, lengths = burst_batch(spans)
    waves = (waves.float() * torch.tensor(levels * 100)[:, None] / 0.1).round().to(torch.int16)
    synth = torch.zeros(len(waves), dtype=torch.bool)
    bank = white_bank()
    clean = prepare_batch(waves, lengths, synth, bank, quiet_path(noise={"enabled": False}), train=True)
    speech_rms = speech_stats(waves, lengths).rms
    fixed = prepare_batch(waves, lengths, synth, bank, quiet_path(noise={"p": 1.0, "snr_db": [10, 10]}), True)
    noise_rms = (fixed - clean).pow(2).mean(dim=1).sqrt()
    snr = 20 * torch.log10(speech_rms / noise_rms)
    assert torch.allclose(snr, torch.full_like(snr, 10.0), atol=0.05)
    ranged = quiet_path(noise={"p": 0.5, "snr_db": [0, 20]})
    mixed = prepare_batch(waves, lengths, synth, bank, ranged, train=True)
    added = (mixed - clean).pow(2).mean(dim=1).sqrt()
    noisy = added > 0
    assert 0.4 < noisy.float().mean() < 0.6  # p
    snr = 20 * torch.log10(speech_rms[noisy] / added[noisy])
    assert snr.min() > -0.05 and snr.max() < 20.05 and snr.min() < 2 and snr.max() > 18


def test_silence_is_noise_at_a_streams_level_below_the_batchs_speech():
    torch.manual_seed(0)
    waves, lengths = burst_batch([(4000, 12000)] * 6 + [(0, 1)] * 200)
    lengths[6:] = 0
    waves[6:] = 0
    synth = torch.arange(len(waves)) >= 6
    cfg = quiet_path(noise={"enabled": False}, silence={"snr_db": [10, 30], "p_zero": 0.1})
    out = prepare_batch(waves, lengths, synth, white_bank(), cfg, train=True)
    speech_level = speech_stats(waves, lengths).rms[:6].median()
    rms = out[6:].pow(2).mean(dim=1).sqrt()
    zero = rms == 0
    assert 0.04 < zero.float().mean() < 0.18  # p_zero
    level_db = 20 * torch.log10(speech_level / rms[~zero])
    assert level_db.min() > 9.95 and level_db.max() < 30.05 and level_db.max() - level_db.min() > 15


def test_silence_snr_p_keeps_a_share_of_loud_gain_silence():
    torch.manual_seed(0)
    waves, lengths = burst_batch([(4000, 12000)] * 6 + [(0, 1)] * 400)
    lengths[6:] = 0
    waves[6:] = 0
    synth = torch.arange(len(waves)) >= 6
    cfg = quiet_path(noise={"enabled": False}, silence={"snr_db": [40, 50], "snr_p": 0.3, "p_zero": 0.0})
    out = prepare_batch(waves, lengths, synth, white_bank(level=0.2), cfg, train=True)
    speech_level = speech_stats(waves, lengths).rms[:6].median()
    level_db = 20 * torch.log10(speech_level / out[6:].pow(2).mean(dim=1).sqrt().clamp_min(1e-12))
    at_snr = (level_db > 39.95) & (level_db < 50.05)
    assert 0.22 < at_snr.float().mean() < 0.38  # snr_p
    # The rest is gain U[0, 1] x the bank's 0.2 RMS: 0 to 14 dB below this speech (RMS ~0.1 / sqrt(2) ...).
    loud = level_db[~at_snr]
    assert loud.max() < 40 and (loud < 10).float().mean() > 0.7


def test_offsets_place_speech_anywhere_keeping_most_of_it_in_the_window():
    torch.manual_seed(0)
    count = 1500
    waves, lengths = burst_batch([(6000, 10000)] * count)  # 0.25 s of speech, centred
    synth = torch.zeros(count, dtype=torch.bool)
    cfg = quiet_path(noise={"enabled": False}, stream={"offset_p": 1.0, "min_speech_kept": 0.75})
    out = prepare_batch(waves, lengths, synth, white_bank(), cfg, train=True)
    kept = out.pow(2).sum(dim=1) / waves.float().div(INT16_SCALE).pow(2).sum(dim=1)
    assert kept.min() > 0.73  # >= 75 % of the speech (sampling noise of a 4000-sample burst)
    # Starts are uniform in [-7000, 7000] (up to 1000 samples of speech outside): 2000 of the 14001 cut
    # the word at a window edge, as a stream's windows do.
    assert 0.1 < (kept < 0.99).float().mean() < 0.19
    onset = (out != 0).float().argmax(dim=1)
    assert onset.max() > 12500 and (out[:, 0] != 0).float().mean() > 0.04
    whole = onset[(out[:, 0] == 0) & (out[:, -1] == 0)]
    assert whole.min() < 500 and whole.max() > 11500  # the whole window is used
    half = prepare_batch(waves, lengths, synth, white_bank(), quiet_path(
        noise={"enabled": False}, stream={"offset_p": 0.5}), train=True)  # fmt: skip
    moved = ~(half == window(waves, center_starts(lengths, 16000), 16000).float() / INT16_SCALE).all(dim=1)
    assert 0.45 < moved.float().mean() < 0.55


@pytest.mark.parametrize("preset", ["default", "none", "white_noise", "no_noise_files"])
def test_options_off_give_bit_identical_batches(preset):
    conf = Path(__file__).resolve().parents[1] / "conf" / "augment"
    values = OmegaConf.to_container(
        OmegaConf.load(conf / f"{'none' if preset == 'none' else 'default'}.yaml")
    )
    if preset == "white_noise":
        values["white_noise"]["enabled"] = True
    cfg = AugmentConfig.from_mapping(values)
    torch.manual_seed(5)
    waves = (torch.randn(64, 17000) * 3000).to(torch.int16)
    lengths = torch.randint(1000, 17001, (64,))
    for row, n in enumerate(lengths.tolist()):
        waves[row, n:] = 0
    synth = torch.rand(64) < 0.2
    lengths[synth] = 0
    waves[synth] = 0
    bank = NoiseBank([]) if preset == "no_noise_files" else white_bank(3.0)
    for train in (True, False):
        torch.manual_seed(11)
        new = prepare_batch(waves, lengths, synth, bank, cfg, train)
        new_state = torch.get_rng_state()
        torch.manual_seed(11)
        old = old_prepare_batch(waves, lengths, synth, bank, cfg, train)
        assert torch.equal(new, old)
        assert torch.equal(new_state, torch.get_rng_state())  # as many random draws: later batches agree too


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"noise": {"snr_db": [20, 0]}}, "noise.snr_db"),
        ({"silence": {"snr_db": [5]}}, "silence.snr_db"),
        ({"stream": {"offset_p": 1.5}}, "stream.offset_p"),
        ({"stream": {"min_speech_kept": 0.0}}, "min_speech_kept"),
        ({"stream": {"half_keywords": 0.1}}, "augment.stream has unknown keys"),
        ({"silence": {"snr_p": 1.5}}, "silence.snr_p"),
    ],
)
def test_stream_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_mapping(values)


def test_recipe_is_best_plus_the_stream_augmentation():
    best, stream = compose_train("experiment=best"), compose_train("experiment=best_stream")
    plain = {key: OmegaConf.to_container(cfg, resolve=False) for key, cfg in (("best", best), ("s", stream))}
    for name in ("augment", "task_name", "tags"):
        plain["best"].pop(name), plain["s"].pop(name)
    assert plain["best"]["loss"]["label_smoothing"] == 0.1 and plain["s"]["loss"]["label_smoothing"] == 0.0
    plain["best"]["loss"].pop("label_smoothing"), plain["s"]["loss"].pop("label_smoothing")
    assert plain["best"] == plain["s"]  # same model, data draws, optimiser, loss otherwise, schedule
    assert AugmentConfig.from_mapping(best.augment).stream.offset_p == 0.0  # `best` unchanged
    augment = AugmentConfig.from_mapping(stream.augment)
    assert augment.stream.offset_p > 0 and augment.stream.half_keyword_unknown > 0
    assert augment.noise.snr_db is not None and augment.silence.snr_db is not None


def test_datamodule_relabels_keyword_halves_in_training_batches_only(synthetic_overrides, tmp_path):
    cfg = compose_train(
        "experiment=best_stream", *synthetic_overrides, "augment.stream.half_keyword_unknown=0.5"
    )
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    changed = datamodule.with_hard_negatives(batch)
    moved = changed["targets"] != batch["targets"]
    assert moved.any() and (batch["targets"][moved] >= KEYWORD).all()
    assert (changed["targets"][moved] == UNKNOWN_INDEX).all()
    waves = datamodule.to_model_input(changed, train=True)
    assert waves.shape == (len(batch["targets"]), 16000) and waves.abs().max() <= 1.0
    # Outside training (no trainer, or validation) batches keep their labels.
    _, targets = datamodule.on_after_batch_transfer(batch, 0)
    assert torch.equal(targets, batch["targets"])


def test_recipe_trains_a_few_steps_on_synthetic_speech(synthetic_overrides, run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "experiment=best_stream",
        *synthetic_overrides,
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "data.batch_size=32",
        "test=false",
        "logger=csv",
        "callbacks.tensorboard_extras=null",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    check_ok(result)
    job = json.loads((run_dir / "job_result.json").read_text())
    assert job["status"] == "ok" and job["value"] is not None and np.isfinite(job["value"])
