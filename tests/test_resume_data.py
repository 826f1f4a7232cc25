"""A run resumed from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would."""

import pytest
import pytorch_lightning as pl
import torch
from audio_trees import make_training_tree
from pytorch_lightning.callbacks import ModelCheckpoint
from training_helpers import yes_no_datamodule


class RecordTargets(pl.LightningModule):
    """A tiny model that records each training batch's targets (the sampler's order)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 4)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        waves, targets = batch
        self.seen.append(targets.tolist())
        return torch.nn.functional.cross_entropy(self.layer(waves[:, :1]), targets)

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(root, tmp_path, max_steps, ckpt_path=None, cache_on_device="false", **trainer_kwargs):
    dm = yes_no_datamodule(root, tmp_path, cache_on_device)
    module = RecordTargets()
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen, dm


# "true": the wave cache on the device (issue 32; device=cpu here) resumes the same way.
@pytest.mark.parametrize(
    ("save_at", "on_device"), [("train_step", "false"), ("validation", "false"), ("train_step", "true")]
)
def test_mid_epoch_resume_replays_the_remaining_batches(tmp_path, save_at, on_device):
    root = make_training_tree(tmp_path / "sc", {"yes": 24, "no": 24, "bed": 8}, speakers=24)
    reference, dm = fit(root, tmp_path / "a", max_steps=14, limit_val_batches=0)  # today's path
    steps_per_epoch = len(dm.train_dataloader())
    assert 4 < steps_per_epoch < 14  # the run crosses an epoch boundary, the save lands mid-epoch
    save_every = 3
    if save_at == "train_step":
        kwargs = {
            "callbacks": [ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=save_every)],
            "limit_val_batches": 0,
        }
    else:
        kwargs = {
            "callbacks": [ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
            "val_check_interval": save_every,
            "limit_val_batches": 1,
        }
    first, _ = fit(root, tmp_path / "b", max_steps=save_every, cache_on_device=on_device, **kwargs)
    ckpt = sorted((tmp_path / "ck").glob("*.ckpt"))[-1]
    assert torch.load(ckpt, weights_only=True)["global_step"] == save_every
    rest, _ = fit(
        root,
        tmp_path / "c",
        max_steps=14,
        ckpt_path=str(ckpt),
        limit_val_batches=0,
        cache_on_device=on_device,
    )
    assert first == reference[:save_every]
    assert first + rest == reference
