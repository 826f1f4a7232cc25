"""KWSLightningModule: learning on a fixed batch, the learning-rate schedules, checkpoint contents."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, compose_train, make_trainer

from kws_lightning.callbacks import LastCheckpoint
from kws_lightning.callbacks.console_table import COLUMNS, ConsoleTable
from kws_lightning.labels import make_labels
from kws_lightning.module import KWSLightningModule
from kws_lightning.utils.instantiate import build_kws_model, to_plain
from kws_lightning.utils.lr_schedules import PiecewiseConstantLR, warmup_cosine, warmup_hold_poly

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
LABELS = make_labels(["yes", "no"])  # 4 classes


def tone_batch(per_class: int = 4, num_samples: int = 16000) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c is a tone at 300 * (c + 1) Hz with a random phase plus a little noise."""
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(num_samples) / 16000.0
    targets = torch.arange(len(LABELS)).repeat_interleave(per_class)
    phase = torch.rand(len(targets), 1, generator=generator) * 2 * math.pi
    waves = 0.5 * torch.sin(2 * math.pi * 300.0 * (targets[:, None] + 1) * t + phase)
    waves = waves + 0.01 * torch.randn(waves.shape, generator=generator)
    return waves.float(), targets


def linear_module(optimizer_cfg: DictConfig, scheduler_cfg: DictConfig | None) -> KWSLightningModule:
    """A module around a single linear layer on 16-sample 'waves': fast enough to step hundreds of times."""
    torch.manual_seed(0)
    scheduler = instantiate(scheduler_cfg) if scheduler_cfg else None
    return KWSLightningModule(
        nn.Linear(16, len(LABELS)), LABELS, optimizer=instantiate(optimizer_cfg), scheduler=scheduler
    )


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def run_schedule(tmp_path: Path, *overrides: str, max_steps: int, accumulate: int = 1) -> list[float]:
    """The lr in force at each optimiser step of a real fit, with optimizer/scheduler from conf/."""
    cfg = compose_train(*overrides)
    module = linear_module(cfg.optimizer, cfg.scheduler)
    recorder = RecordLR()
    trainer = make_trainer(
        tmp_path, max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[recorder]
    )
    batch = (torch.randn(8, 16), torch.randint(0, len(LABELS), (8,)))
    trainer.fit(module, train_dataloaders=DataLoader(RepeatBatch(batch, 1000), batch_size=None))
    assert trainer.global_step == max_steps
    return recorder.lrs


def test_training_steps_lower_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = compose_train("feature=mfcc", "model=cnn_trad_pool2", "model.n_feature_maps=16", "optimizer=adam")
    model = build_kws_model(cfg.feature, cfg.model, num_classes=len(LABELS))
    module = KWSLightningModule(model, LABELS, optimizer=instantiate(cfg.optimizer))
    batch = tone_batch()

    def loss_on_batch() -> float:
        module.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(module(batch[0]), batch[1]).item()
        module.train()
        return loss

    before = loss_on_batch()
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.fit(module, train_dataloaders=DataLoader(RepeatBatch(batch, 6), batch_size=None))
    after = loss_on_batch()
    assert trainer.global_step == 6
    assert after < 0.7 * before, (before, after)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_piecewise_constant_switches_at_the_boundary_step() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = PiecewiseConstantLR(optimizer, [[0, 0.01], [200, 0.001], [300, 1e-4]])
    lrs = []
    for _ in range(302):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == lrs[199] == 0.01
    assert lrs[200] == lrs[299] == 0.001
    assert lrs[300] == lrs[301] == 1e-4


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([[10, 0.01]], "must start at step 0"),
        ([[0, 0.1], [5, 0.01], [5, 0.001]], "strictly increase"),
        ([0.1], "pairs"),
    ],
)
def test_piecewise_constant_rejects_bad_schedules(schedule: list, message: str) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        PiecewiseConstantLR(optimizer, schedule)


def test_step_scheduler_config_in_a_fit(tmp_path: Path) -> None:
    lrs = run_schedule(tmp_path, "scheduler=step", "scheduler.schedule=[[0,0.01],[3,0.001]]", max_steps=6)
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.001])


def test_warmup_cosine_values() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_cosine(optimizer, total_steps=20, warmup_steps=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    assert lrs[12] == pytest.approx(0.01 + 0.09 * 0.5)  # half-way through the cosine
    assert lrs[20] == pytest.approx(0.01)  # floor = min_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(optimizer, total_steps=10, warmup_steps=10)


def test_cosine_config_takes_total_steps_from_the_trainer(tmp_path: Path) -> None:
    lrs = run_schedule(
        tmp_path,
        "optimizer.lr=0.1",
        "scheduler=cosine",
        "scheduler.warmup_steps=2",
        max_steps=10,
        accumulate=2,
    )
    # total_steps = estimated_stepping_batches = max_steps = 10 optimiser steps (20 batches accumulated by 2).
    expected = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx(expected)


def lrs_of(scheduler_factory, steps: int, lr: float = 0.05) -> list[float]:
    """The lr in force at each of `steps` optimiser steps (one param group)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = scheduler_factory(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_hold_poly_values_follow_nemo() -> None:
    """MatchboxNet's NeMo schedule over 1000 steps: W = 50, hold to H = 50 + 450 = 500, decay over 500."""
    lrs = lrs_of(lambda opt: warmup_hold_poly(opt, total_steps=1000, min_lr=0.001), steps=1002)
    assert lrs[0] == pytest.approx(0.05 / 51)  # NeMo: lr * (step + 1) / (W + 1)
    assert lrs[24] == pytest.approx(0.05 * 25 / 51)
    assert lrs[50] == pytest.approx(0.05)  # peak at step W ...
    assert lrs[50:501] == pytest.approx([0.05] * 451)  # ... held through step H
    assert lrs[750] == pytest.approx(0.001 + 0.049 * 0.5**2)  # half-way: (1 - 0.5)^2 of the span
    assert lrs[999] == pytest.approx(0.001 + 0.049 * (1 / 500) ** 2)  # the last step of the run
    assert lrs[1000] == lrs[1001] == pytest.approx(0.001)  # min_lr is absolute and is where it stays
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:], strict=False))
    # Steps truncate as NeMo's int(): 0.05 * 30 = 1.5 -> W = 1, 0.45 * 30 = 13.5 -> H = 1 + 13 = 14.
    short = lrs_of(lambda opt: warmup_hold_poly(opt, total_steps=30, power=1.0), steps=30, lr=0.1)
    assert short[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert short[14] == pytest.approx(0.1) and short[22] == pytest.approx(0.1 * (1 - 8 / 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_fraction": 1.0}, "scheduler.warmup_fraction"),
        ({"hold_fraction": -0.1}, "scheduler.hold_fraction"),
        ({"warmup_fraction": 0.5, "hold_fraction": 0.5}, "below 1"),
        ({"power": 0.0}, "scheduler.power"),
        ({"min_lr": 0.5}, "scheduler.min_lr"),
        ({"total_steps": 0}, "scheduler.total_steps"),
    ],
)
def test_warmup_hold_poly_rejects_bad_settings(kwargs: dict, message: str) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        warmup_hold_poly(optimizer, **{"total_steps": 100, **kwargs})


def test_poly_hold_config_takes_total_steps_from_the_trainer(tmp_path: Path) -> None:
    lrs = run_schedule(
        tmp_path, "optimizer.lr=0.1", "scheduler=poly_hold", "scheduler.hold_fraction=0.3", max_steps=20
    )
    # total_steps = 20: W = int(1.0) = 1, H = 1 + 6 = 7, then 13 decay steps from 0.1 to min_lr 0.001.
    expected = [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    expected += [0.001 + 0.099 * (1 - k / 13) ** 2 for k in range(13)]
    assert lrs == pytest.approx(expected)


def test_onecycle_config_matches_torch_onecycle(tmp_path: Path) -> None:
    lrs = run_schedule(tmp_path, "optimizer=adam", "optimizer.lr=0.01", "scheduler=onecycle", max_steps=12)
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.01)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.01, total_steps=12, pct_start=0.3, div_factor=25.0, final_div_factor=1e4,
        cycle_momentum=False,
    )  # fmt: skip
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(0.01 / 25) and 0.009 < max(lrs) <= 0.01 and lrs[-1] < 1e-4


def test_checkpoint_stores_labels_and_rebuilds_the_model(tmp_path: Path) -> None:
    cfg = compose_train("feature=logmel", "model=cnn_trad_pool2", "model.n_feature_maps=8")
    model = build_kws_model(cfg.feature, cfg.model, num_classes=len(LABELS))
    config = {"feature": to_plain(cfg.feature), "model": to_plain(cfg.model)}
    module = KWSLightningModule(model, LABELS, optimizer=instantiate(cfg.optimizer), config=config)
    batch = tone_batch(per_class=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)
    trainer = make_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    loader = DataLoader(RepeatBatch(batch, 2), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)

    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["labels"] == LABELS
    assert saved["hyper_parameters"]["clip_samples"] == 16000
    assert saved["global_step"] == 2
    # val/acc_best survives in the checkpoint, so a resumed run keeps its best.
    assert saved["state_dict"]["val_acc_best.max_value"] == pytest.approx(
        float(trainer.callback_metrics["val/acc"])
    )

    restored = KWSLightningModule.from_checkpoint(checkpoint.best_model_path)
    assert restored.labels == LABELS
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch[0]), module(batch[0]))


def test_from_checkpoint_rejects_foreign_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match="not written by"):
        KWSLightningModule.from_checkpoint(path)


class RecordValidation(Callback):
    def __init__(self) -> None:
        self.best_at_train_start: float | None = None
        self.val_accs: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.best_at_train_start = float(pl_module.val_acc_best.max_value)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_accs.append(float(trainer.callback_metrics["val/acc"]))


def test_val_acc_best_ignores_the_sanity_check_and_console_table_prints_rows(tmp_path: Path, capsys) -> None:
    cfg = compose_train("optimizer.lr=0.5")
    module = linear_module(cfg.optimizer, None)
    generator = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(8, 16, generator=generator),
        torch.randint(0, len(LABELS), (8,), generator=generator),
    )
    loader = DataLoader(RepeatBatch(batch, 3), batch_size=None)
    recorder = RecordValidation()
    trainer = make_trainer(
        tmp_path, max_epochs=3, num_sanity_val_steps=1, callbacks=[ConsoleTable(), recorder]
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)

    assert recorder.best_at_train_start == -math.inf  # the sanity check did not count
    assert len(recorder.val_accs) == 3
    assert float(trainer.callback_metrics["val/acc_best"]) == pytest.approx(max(recorder.val_accs))

    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.split() == " ".join(COLUMNS).split())
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    # rate, iter, epoch, valid loss, valid acc, train loss, train acc, elapsed: one row per epoch.
    assert [row[1:3] for row in rows] == [["3", "0"], ["6", "1"], ["9", "2"]]
    assert [float(row[0]) for row in rows] == pytest.approx([0.5] * 3)
    assert [float(row[4]) for row in rows] == pytest.approx(recorder.val_accs, abs=1e-4)
    assert all(row[7].count(":") == 2 for row in rows)  # elapsed h:mm:ss


def test_last_checkpoint_follows_the_latest_step_not_the_best(tmp_path: Path) -> None:
    cfg = compose_train("optimizer.lr=0.0")  # lr 0: val/acc never improves after the first validation
    module = linear_module(cfg.optimizer, None)
    batch = (torch.randn(8, 16), torch.randint(0, len(LABELS), (8,)))
    loader = DataLoader(RepeatBatch(batch, 100), batch_size=None)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")
    last = LastCheckpoint(dirpath=str(tmp_path))
    trainer = make_trainer(
        tmp_path,
        max_steps=5,  # stops between validations (every 2 batches)
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[best, last],
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)

    def step_of(name: str) -> int:
        return torch.load(tmp_path / name, map_location="cpu", weights_only=True)["global_step"]

    assert step_of("best.ckpt") == 2
    assert step_of("last.ckpt") == 5
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
