"""The device-resident gather (`DeviceClipBatches`, issue 32) builds the same batches as `ClipBatches`."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from audio_trees import make_training_tree
from training_helpers import make_trainer, yes_no_datamodule

from kws_lightning.data.datamodule import SpeechCommandsDataModule
from kws_lightning.data.dataset import ClipBatches, DeviceClipBatches
from kws_lightning.data.wave_cache import WaveCache


def _cache(rng: np.random.Generator) -> tuple[WaveCache, np.ndarray]:
    lengths = rng.integers(0, 400, 50)
    lengths[[3, 17]] = 0  # skipped clips
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    samples = rng.integers(-32768, 32767, int(offsets[-1]), dtype=np.int16)
    return WaveCache(samples, offsets), rng.integers(2, 12, 50)


@pytest.mark.parametrize("fixed", [False, True])
def test_device_gather_matches_cpu_batches(fixed: bool) -> None:
    rng = np.random.default_rng(0)
    cache, targets = _cache(rng)
    silence = rng.integers(-32768, 32767, (7, 500), dtype=np.int16) if fixed else None
    cpu = ClipBatches(cache, targets, silence)
    device = DeviceClipBatches(cache, targets, "cpu")
    device_silence = None if silence is None else torch.from_numpy(silence)
    for epoch in range(3):  # several epochs' worth of batches, silence (negative ids) mixed in
        ids = np.random.default_rng(epoch).permutation(np.arange(-10, len(cache)))
        for start in range(0, len(ids), 16):
            batch = ids[start : start + 16].tolist()
            want, got = cpu.__getitems__(batch), device(torch.tensor(batch), device_silence)
            assert want.keys() == got.keys()
            for key in want:
                assert got[key].dtype == want[key].dtype, key
                assert torch.equal(got[key], want[key]), key


class RecordBatches(pl.LightningModule):
    """Records every batch the model receives (augmented waves and targets), training and validation."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 4)
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        waves, targets = batch
        self.seen.append(("train", waves.clone(), targets.clone()))
        return torch.nn.functional.cross_entropy(self.layer(waves[:, :1]), targets)

    def validation_step(self, batch, batch_idx):
        waves, targets = batch
        self.seen.append(("val", waves.clone(), targets.clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(root, tmp_path, cache_on_device: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    pl.seed_everything(3)
    dm = yes_no_datamodule(root, tmp_path, cache_on_device)
    module = RecordBatches()
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=dm)
    assert dm.cache_on_device() == (cache_on_device == "true")
    return module.seen


def test_device_path_gives_the_same_batches_for_two_epochs(tmp_path) -> None:
    root = make_training_tree(tmp_path / "sc", {"yes": 16, "no": 16, "bed": 6}, speakers=16, short_every=4)
    today = _fit(root, tmp_path, "false")
    on_device = _fit(root, tmp_path, "true")
    assert {kind for kind, _, _ in today} == {"train", "val"}
    assert len(today) == len(on_device)
    for (kind_a, waves_a, targets_a), (kind_b, waves_b, targets_b) in zip(today, on_device, strict=True):
        assert kind_a == kind_b
        assert torch.equal(waves_a, waves_b) and torch.equal(targets_a, targets_b)


def test_cache_on_device_rejects_an_unknown_value() -> None:
    with pytest.raises(ValueError, match="data.cache_on_device='gpu'"):
        SpeechCommandsDataModule(root="sc", cache_dir="cache", cache_on_device="gpu")
