"""The DataModule end to end on real WAV folders: batches, proportions, fixed eval draws, errors."""

import numpy as np
import pytest
import torch
from audio_trees import DEV_DATA, make_training_tree, write_wav

from kws_lightning.data.datamodule import SpeechCommandsDataModule

WORDS = {"yes": 40, "no": 40, "bed": 12, "cat": 12}


def make_dm(root, tmp_path, **kwargs):
    kwargs.setdefault("keywords", ["yes", "no"])
    kwargs.setdefault("batch_size", 16)
    dm = SpeechCommandsDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def test_batches_after_transfer_are_float_clips_with_targets(tmp_path):
    root = make_training_tree(tmp_path / "sc", WORDS, short_every=5)
    dm = make_dm(root, tmp_path)
    assert dm.labels == ["silence", "unknown", "yes", "no"] and dm.num_classes == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["waves"].dtype == torch.int16
    waves = dm.to_model_input(batch, train=True)
    assert waves.shape == (16, 16000) and waves.dtype == torch.float32
    assert waves.abs().max() <= 1.0
    val_batch = next(iter(dm.val_dataloader()))
    val_waves = dm.to_model_input(val_batch, train=False)
    assert val_waves.shape[1] == 16000
    assert set(val_batch["targets"].tolist()) <= {0, 1, 2, 3}


def test_targets_match_folder_words(tmp_path):
    root = make_training_tree(tmp_path / "sc", WORDS)
    dm = make_dm(root, tmp_path, silence_percentage=0.0, unknown_percentage=0.0, batch_size=200)
    batch = next(iter(dm.train_dataloader()))
    # Each word was written as a tone of its own frequency (audio_trees): bed 200 Hz ... yes 470 Hz.
    freqs = {"bed": 200.0, "cat": 290.0, "no": 380.0, "yes": 470.0}
    waves = batch["waves"].float()
    spectrum = torch.fft.rfft(waves[:, :16000]).abs()
    peak_hz = spectrum.argmax(dim=1).float() * 16000 / 16000
    for target, peak in zip(batch["targets"].tolist(), peak_hz.tolist(), strict=True):
        assert abs(peak - freqs[dm.labels[target]]) < 2


def test_epoch_class_counts_follow_proportions(tmp_path):
    root = make_training_tree(tmp_path / "sc", WORDS, speakers=40)
    dm = make_dm(root, tmp_path)
    counts = dm.class_counts("training")
    known = counts["yes"] + counts["no"]
    total = sum(counts.values())
    assert counts["silence"] == counts["unknown"] == round(known / 0.8 * 0.1)
    assert counts["silence"] / total == pytest.approx(0.1, abs=0.01)
    seen = np.array([t for b in dm.train_dataloader() for t in b["targets"].tolist()])
    assert np.bincount(seen, minlength=4).tolist() == [counts[name] for name in dm.labels]


def test_validation_is_fixed_and_training_silence_is_fresh(tmp_path):
    root = make_training_tree(tmp_path / "sc", WORDS, speakers=40)
    dm = make_dm(root, tmp_path, validation_percentage=30.0)
    first = [dm.to_model_input(b, train=False) for b in dm.val_dataloader()]
    second = [dm.to_model_input(b, train=False) for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    val_targets = torch.cat([b["targets"] for b in dm.val_dataloader()])
    val_waves = torch.cat(first)
    silence = val_waves[val_targets == 0]
    assert len(silence) > 0 and silence.abs().amax(dim=1).max() > 0  # drawn from the noise, not all zero
    torch.manual_seed(0)
    train_batches = list(dm.train_dataloader())
    a = torch.cat([dm.to_model_input(b, train=True)[b["synth_silence"]] for b in train_batches])
    b = torch.cat([dm.to_model_input(b, train=True)[b["synth_silence"]] for b in train_batches])
    assert a.shape == b.shape and not torch.equal(a, b)


def test_corrupt_clip_is_skipped_and_reported(tmp_path, caplog):
    root = make_training_tree(tmp_path / "sc", WORDS)
    (root / "yes" / "deadbeef_nohash_0.wav").write_bytes(b"RIFF....not a wave")
    dm = make_dm(root, tmp_path)
    assert "skipped 1 of 105 clips" in caplog.text and "deadbeef_nohash_0.wav" in caplog.text
    items = np.concatenate([dm.train_sampler.epoch_items(), *dm.eval_items.values()])
    broken = dm.dataset.clips.index[dm.dataset.clips.rel == "yes/deadbeef_nohash_0.wav"].item()
    assert broken not in items


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        SpeechCommandsDataModule()
    only_keywords = make_training_tree(tmp_path / "kw", {"yes": 20, "no": 20})
    with pytest.raises(ValueError, match="unknown_percentage=0"):
        make_dm(only_keywords, tmp_path)
    make_dm(only_keywords, tmp_path, unknown_percentage=0.0)  # fine without unknown words
    sparse = make_training_tree(tmp_path / "sparse", {"yes": 20, "bed": 5})
    write_wav(sparse / "no" / "0000ffff_nohash_0.wav", np.zeros(16000, np.int16))
    (sparse / "testing_list.txt").write_text("no/0000ffff_nohash_0.wav\n")
    with pytest.raises(ValueError, match=r"\['no'\] have no usable training clips"):
        make_dm(sparse, tmp_path)
    with pytest.raises(ValueError, match="augment has unknown keys"):
        SpeechCommandsDataModule(root="x", augment={"nosie": {}})


@pytest.mark.skipif(not DEV_DATA.is_dir(), reason=f"real dev set not found at {DEV_DATA} (set KWS_DEV_DATA)")
def test_real_dev_set_epoch_composition(tmp_path):
    dm = make_dm(
        DEV_DATA,
        tmp_path,
        keywords=["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"],
        batch_size=128,
    )
    train = dm.class_counts("training")
    assert train["yes"] == 623 and train["on"] == 209 and train["off"] == 209
    known = sum(v for k, v in train.items() if k not in ("silence", "unknown"))
    assert known == 5683 - 337
    assert train["silence"] == train["unknown"] == round(known / 0.8 * 0.1)
    validation = dm.class_counts("validation")
    assert sum(validation.values()) - validation["silence"] - validation["unknown"] == 721 - 50
    lengths = dm.cache.lengths
    assert (lengths < 16000).sum() == 449 and (lengths > 0).all()
    batch = next(iter(dm.val_dataloader()))
    assert dm.to_model_input(batch, train=False).shape == (128, 16000)


def test_recorded_paths_are_absolute(tmp_path, monkeypatch):
    root = make_training_tree(tmp_path / "sc", WORDS)
    monkeypatch.chdir(tmp_path)
    dm = SpeechCommandsDataModule(root="sc", cache_dir="cache")
    assert dm.hparams.root == str(root.resolve())
    assert dm.hparams.cache_dir == str((tmp_path / "cache").resolve())
