"""Training recipe knobs: SpecAugment, mixup, label smoothing, EMA and SWA, and the experiment recipes."""

from __future__ import annotations

import copy
import functools
import math
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, compose_train, make_trainer

from kws_lightning.callbacks import EMA, LastCheckpoint
from kws_lightning.callbacks.ema import RAW_WEIGHTS_KEY
from kws_lightning.data.augment import AugmentConfig, NoiseBank, prepare_batch
from kws_lightning.labels import DEFAULT_KEYWORDS, make_labels
from kws_lightning.mixup import MixedBatch, Mixup
from kws_lightning.models.summary import count_parameters
from kws_lightning.module import KWSLightningModule
from kws_lightning.optim import NovoGrad
from kws_lightning.spec_augment import SpecAugment, band_mask, rect_mask
from kws_lightning.utils.instantiate import build_kws_model, instantiate_named, to_plain
from kws_lightning.utils.lr_schedules import warmup_cosine
from kws_lightning.utils.sweep_job import register_resolvers

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
LABELS = make_labels(["yes", "no"])  # 4 classes
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.batch_size=16"]


def linear_module(lr: float = 0.5, **kwargs) -> KWSLightningModule:
    """A module around one linear layer on 16-sample 'waves': hundreds of steps per second."""
    torch.manual_seed(0)
    optimizer = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9})
    return KWSLightningModule(nn.Linear(16, len(LABELS)), LABELS, optimizer=optimizer, **kwargs)


def toy_batch(seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 16, generator=generator), torch.randint(
        0, len(LABELS), (size,), generator=generator
    )


def loader(batch: tuple[torch.Tensor, torch.Tensor], length: int) -> DataLoader:
    return DataLoader(RepeatBatch(batch, length), batch_size=None)


# ---- SpecAugment -------------------------------------------------------------------------------------------


def sentinel_mask(augment: SpecAugment, features: torch.Tensor) -> torch.Tensor:
    """Where `augment` (constant fill -1e4) masked `features`: (B, T, F) bool."""
    return (augment(features) == -1e4)[:, 0]


def test_spec_augment_masks_are_bands_of_the_configured_widths() -> None:
    torch.manual_seed(0)
    features = torch.randn(3000, 1, 101, 40)
    freq_only = SpecAugment(freq_masks=1, freq_width=7, time_masks=0, mask_value=-1e4).train()
    mask = sentinel_mask(freq_only, features)
    columns = mask[:, 0, :]  # a frequency mask spans every frame: the first frame tells which bins
    assert torch.equal(mask, columns[:, None, :].expand_as(mask))
    widths = columns.sum(dim=1)
    # One contiguous band per clip: first masked bin + width - 1 = last masked bin.
    first = columns.float().argmax(dim=1)
    last = 39 - columns.flip(1).float().argmax(dim=1)
    banded = widths > 0
    assert torch.equal((last - first + 1)[banded], widths[banded])
    # Widths U{0..7}: every width occurs, none wider; bands reach both edges (no off-by-one in the starts).
    assert set(widths.tolist()) == set(range(8))
    assert columns[:, 0].any() and columns[:, 39].any()

    time_only = SpecAugment(freq_masks=0, time_masks=2, time_width=10, mask_value=-1e4).train()
    mask = sentinel_mask(time_only, features)
    rows = mask[:, :, 0]
    assert torch.equal(mask, rows[:, :, None].expand_as(mask))
    assert rows.sum(dim=1).max() == 20  # two masks of at most 10 frames each
    assert rows[:, 0].any() and rows[:, 100].any()


def test_spec_augment_is_per_example_and_identity_in_eval() -> None:
    torch.manual_seed(0)
    augment = SpecAugment()  # defaults: 2 x 7 bins, 2 x 10 frames, per-example mean fill
    features = torch.randn(1, 1, 101, 40).expand(16, 1, 101, 40).contiguous()
    out = augment.train()(features)
    assert out.shape == features.shape
    changed = (out != features).flatten(1)
    assert changed.any(dim=1).float().mean() > 0.9  # nearly every clip is masked somewhere
    # The same clip 16 times gets 16 different mask patterns (one draw per example, not one per batch).
    assert len({tuple(row.nonzero().flatten().tolist()) for row in changed}) >= 15
    assert augment.eval()(features) is features


def test_spec_augment_mean_fill_is_each_clips_average_over_time_per_bin() -> None:
    torch.manual_seed(0)
    features = torch.randn(4, 1, 101, 40) * 5 + torch.linspace(-70, 10, 40)  # MFCC-like bin offsets
    out = SpecAugment(freq_masks=0, time_masks=2, time_width=30).train()(features)
    mean = features.mean(dim=2, keepdim=True).expand_as(features)
    masked = out != features
    assert masked.any()
    torch.testing.assert_close(out[masked], mean[masked])


def test_band_mask_handles_empty_and_oversized_bands() -> None:
    assert not band_mask(4, 40, 0, 7, torch.device("cpu")).any()
    assert not band_mask(4, 40, 3, 0, torch.device("cpu")).any()
    torch.manual_seed(0)
    wide = band_mask(200, 5, 1, 50, torch.device("cpu"))  # width capped at the axis length
    assert wide.sum(dim=1).max() == 5


def test_spec_augment_without_rectangles_draws_the_same_masks_as_before() -> None:
    """rect_masks=0 (the default), or rectangles of zero extent, leave the band masks and the random stream
    exactly as they were: the same seed gives bit-identical output."""
    features = torch.randn(64, 1, 101, 40)
    bands = dict(freq_masks=2, freq_width=7, time_masks=2, time_width=10, mask_value=-1e4)
    torch.manual_seed(3)
    time_mask = band_mask(64, 101, 2, 10, features.device)  # forward's draws, in forward's order
    freq_mask = band_mask(64, 40, 2, 7, features.device)
    expected = torch.where(time_mask[:, None, :, None] | freq_mask[:, None, None, :], -1e4, features)
    next_draw = torch.rand(1)
    for rects in ({}, {"rect_masks": 0, "rect_time": 25, "rect_freq": 15}, {"rect_masks": 5, "rect_time": 0}):
        torch.manual_seed(3)
        out = SpecAugment(**bands, **rects).train()(features)
        assert torch.equal(out, expected), rects
        assert torch.equal(torch.rand(1), next_draw), rects  # no extra random numbers drawn


def test_spec_augment_rectangles_follow_nemo_spec_cutout() -> None:
    torch.manual_seed(0)
    features = torch.randn(3000, 1, 101, 64)
    one = SpecAugment(freq_masks=0, time_masks=0, rect_masks=1, rect_time=25, rect_freq=15, mask_value=-1e4)
    mask = sentinel_mask(one.train(), features)  # (B, T, F)
    frames, bins = mask.any(dim=2), mask.any(dim=1)
    lengths, heights = frames.sum(dim=1), bins.sum(dim=1)
    drawn = lengths > 0
    # Each mask is one full rectangle: its bounding box, nothing outside.
    assert torch.equal(mask.sum(dim=(1, 2)), lengths * heights)
    assert torch.equal(mask, frames[:, :, None] & bins[:, None, :])
    # Sides U{0..25} frames x U{0..15} bins: every size occurs, none larger.
    assert set(lengths[drawn].tolist()) == set(range(1, 26)) and set(heights[drawn].tolist()) == set(
        range(1, 16)
    )
    # Starts U{0..size - max side} (NeMo's SpecCutout): from the first frame/bin to 101 - 25 and 64 - 15.
    first_frame = frames.float().argmax(dim=1)[drawn]
    first_bin = bins.float().argmax(dim=1)[drawn]
    assert first_frame.min() == 0 and first_frame.max() == 76
    assert first_bin.min() == 0 and first_bin.max() == 49
    # Five per example, each drawn for itself: at most 5 x 25 x 15 cells, and different across a batch.
    five = SpecAugment(freq_masks=0, time_masks=0, rect_masks=5, rect_time=25, rect_freq=15, mask_value=-1e4)
    mask = sentinel_mask(five.train(), features[:200])
    area = mask.sum(dim=(1, 2)).float()
    assert area.max() <= 5 * 25 * 15 and 400 < area.mean() < 500  # E[one] = 12.5 x 7.5; overlaps shave it
    assert len({tuple(row.nonzero().flatten().tolist()) for row in mask.flatten(1)}) == 200
    # Evaluation: the identity; the repr names the rectangles.
    assert five.eval()(features) is features
    assert "rect_masks=5, rect_time=25, rect_freq=15" in repr(five)
    # Sides larger than the axis are capped at it (NeMo would fail): starts 0, up to the whole plane.
    capped = rect_mask(2000, 10, 8, 1, 200, 200, torch.device("cpu"))
    assert capped.all(dim=2).all(dim=1).any() and not capped[~capped[:, 0, 0]].any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"freq_width": -1}, "freq_width"),
        ({"time_masks": 1.5}, "time_masks"),
        ({"mask_value": "zero"}, "mean"),
        ({"rect_masks": -1}, "rect_masks"),
        ({"rect_time": 2.5}, "rect_time"),
    ],
)
def test_spec_augment_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpecAugment(**kwargs)


class RecordFeatures(nn.Module):
    """A stand-in SpecAugment that records what it is given and returns it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(features.shape))
        return features


def test_module_applies_spec_augment_between_frontend_and_net_in_training_only(tmp_path: Path) -> None:
    cfg = compose_train("feature=logmel", "model=cnn_trad_pool2", "model.n_feature_maps=4")
    model = build_kws_model(cfg.feature, cfg.model, num_classes=len(LABELS))
    recorder = RecordFeatures()
    optimizer = instantiate(cfg.optimizer)
    module = KWSLightningModule(model, LABELS, optimizer=optimizer, spec_augment=recorder)
    batch = (0.1 * torch.randn(4, 16000), torch.tensor([0, 1, 2, 3]))
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader(batch, 2), val_dataloaders=loader(batch, 1))
    assert recorder.shapes == [(4, 1, 101, 40)] * 2  # two training steps; validation bypasses it
    # The model (what checkpoints and exports hold) is still frontend + net.
    assert not any("spec_augment" in name for name, _ in module.model.named_modules())

    with pytest.raises(ValueError, match="frontend"):
        KWSLightningModule(nn.Linear(16, 4), LABELS, spec_augment=SpecAugment())


# ---- mixup and label smoothing -----------------------------------------------------------------------------


def test_mixup_with_lambda_one_is_plain_cross_entropy() -> None:
    waves, targets = toy_batch()
    logits = torch.randn(8, len(LABELS))
    mixed = Mixup.mix(waves, targets, 1.0, torch.randperm(8))
    assert torch.equal(mixed.waves, waves)
    torch.testing.assert_close(mixed.loss(F.cross_entropy, logits), F.cross_entropy(logits, targets))
    unmixed = Mixup(alpha=0.4, p=0.0)(waves, targets)
    assert unmixed.lam == 1.0 and unmixed.waves is waves


def test_mixup_mixes_waves_and_targets_with_the_same_weight() -> None:
    waves, targets = toy_batch()
    permutation = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])
    mixed = Mixup.mix(waves, targets, 0.3, permutation)
    torch.testing.assert_close(mixed.waves, 0.3 * waves + 0.7 * waves[permutation])
    assert torch.equal(mixed.targets_b, targets[permutation])
    assert torch.equal(mixed.dominant_targets, targets[permutation])  # 0.7 > 0.3
    # lam CE(y_a) + (1 - lam) CE(y_b) is the cross-entropy against the mixed label distribution.
    logits = torch.randn(8, len(LABELS))
    soft = 0.3 * F.one_hot(targets, len(LABELS)) + 0.7 * F.one_hot(targets[permutation], len(LABELS))
    torch.testing.assert_close(mixed.loss(F.cross_entropy, logits), F.cross_entropy(logits, soft.float()))
    # ... with label smoothing too (it is linear in the targets as well).
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1)
    expected = F.cross_entropy(logits, 0.9 * soft.float() + 0.1 / len(LABELS))
    torch.testing.assert_close(mixed.loss(smoothed, logits), expected)


def test_mixup_draws_lambda_from_beta_and_applies_with_probability_p() -> None:
    random.seed(0)
    torch.manual_seed(0)
    waves, targets = toy_batch(size=64)
    mixup = Mixup(alpha=0.2, p=0.5)
    lams = [mixup(waves, targets).lam for _ in range(2000)]
    unmixed = sum(lam == 1.0 for lam in lams) / len(lams)
    assert 0.45 < unmixed < 0.55
    drawn = torch.tensor([lam for lam in lams if lam != 1.0])
    assert abs(drawn.mean() - 0.5) < 0.05  # Beta(a, a) is symmetric about 1/2 ...
    assert ((drawn < 0.1) | (drawn > 0.9)).float().mean() > 0.5  # ... and U-shaped for a < 1
    with pytest.raises(ValueError, match="alpha"):
        Mixup(alpha=0.0)
    with pytest.raises(ValueError, match="probability"):
        Mixup(p=1.5)


class FixedMixup(Mixup):
    """Always mixes at lam 0.3 with a fixed permutation: a deterministic training step."""

    permutation = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])

    def __call__(self, waves: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        return self.mix(waves, targets, 0.3, self.permutation)


class CheckTrainingLoss(Callback):
    """Before each step, the loss the step should report; after it, what it reported."""

    def __init__(self, expected_loss) -> None:
        self.expected_loss = expected_loss
        self.pairs: list[tuple[float, float]] = []
        self.targets: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            self._expected = float(self.expected_loss(pl_module.model, *batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs.append((self._expected, float(outputs["loss"])))
        self.targets.append(outputs["targets"])


def test_training_step_uses_mixup_loss_and_dominant_label_accuracy(tmp_path: Path) -> None:
    module = linear_module(mixup=FixedMixup())
    permutation = FixedMixup.permutation

    def expected(model: nn.Module, waves: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(0.3 * waves + 0.7 * waves[permutation])
        return 0.3 * F.cross_entropy(logits, targets) + 0.7 * F.cross_entropy(logits, targets[permutation])

    check = CheckTrainingLoss(expected)
    batch = toy_batch()
    make_trainer(tmp_path, max_steps=3, callbacks=[check]).fit(module, train_dataloaders=loader(batch, 3))
    assert len(check.pairs) == 3
    for want, got in check.pairs:
        assert got == pytest.approx(want, rel=1e-5)
    assert all(torch.equal(t, batch[1][permutation]) for t in check.targets)  # accuracy vs the dominant label


def test_label_smoothing_reaches_the_training_loss_but_not_validation(tmp_path: Path) -> None:
    cfg = compose_train("loss=label_smoothing")
    assert cfg.loss.label_smoothing == 0.1
    module = linear_module(loss=instantiate(cfg.loss))

    def expected(model: nn.Module, waves: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(waves), targets, label_smoothing=0.1)

    check = CheckTrainingLoss(expected)
    batch = toy_batch()
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[check])
    trainer.fit(module, train_dataloaders=loader(batch, 2), val_dataloaders=loader(batch, 1))
    for want, got in check.pairs:
        assert got == pytest.approx(want, rel=1e-5)
        with torch.no_grad():
            plain = F.cross_entropy(module.model(batch[0]), batch[1])
        assert abs(got - float(plain)) > 1e-3  # the smoothing changed the number
    # Validation reports the plain cross-entropy of the (final) weights.
    with torch.no_grad():
        plain = F.cross_entropy(module.model(batch[0]), batch[1])
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(plain), rel=1e-5)


# ---- EMA ---------------------------------------------------------------------------------------------------


class RecordWeights(Callback):
    """The (raw) weights after every optimiser step, and the weights validation ran on."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.in_validation: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.in_validation.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})


def test_ema_decay_schedule() -> None:
    ema = EMA(decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(100_000) == 0.999
    assert EMA(decay=0.9, warmup=False).decay_at(0) == 0.9
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


def test_ema_after_k_steps_equals_the_closed_form(tmp_path: Path) -> None:
    decay, k = 0.8, 6
    ema, weights = EMA(decay=decay, warmup=False), RecordWeights()
    module = linear_module()
    make_trainer(tmp_path, max_steps=k, callbacks=[weights, ema]).fit(
        module, train_dataloaders=loader(toy_batch(), k)
    )
    assert ema.num_updates == k
    for name in ("weight", "bias"):
        w = [weights.initial[name]] + [step[name] for step in weights.after_step]
        # ema_k = d^k w_0 + sum_{i=1..k} (1 - d) d^(k - i) w_i
        closed = decay**k * w[0] + sum((1 - decay) * decay ** (k - i) * w[i] for i in range(1, k + 1))
        torch.testing.assert_close(ema.averaged_weights(module)[name], closed)
        assert not torch.allclose(closed, w[k])  # the average is not just the last weights
    # After training the module holds the average (what a test without a checkpoint runs on).
    torch.testing.assert_close(module.model.weight, ema.averaged_weights(module)["weight"])


def test_ema_with_warmup_follows_its_decay_schedule(tmp_path: Path) -> None:
    ema, weights = EMA(decay=0.999, warmup=True), RecordWeights()
    module = linear_module()
    make_trainer(tmp_path, max_steps=4, callbacks=[weights, ema]).fit(
        module, train_dataloaders=loader(toy_batch(), 4)
    )
    average = weights.initial["weight"]
    for n, step in enumerate(weights.after_step):
        d = (1 + n) / (10 + n)
        average = d * average + (1 - d) * step["weight"]
    torch.testing.assert_close(ema.averaged_weights(module)["weight"], average)


def test_ema_weights_are_validated_and_saved_for_inference(tmp_path: Path) -> None:
    """Validation runs on the average; a checkpoint's state_dict is the average (what eval/export load) and
    keeps the raw weights beside it; rebuilt from the checkpoint, the model is the average."""
    cfg = compose_train("feature=logmel", "model=cnn_trad_pool2", "model.n_feature_maps=4")
    torch.manual_seed(0)
    model = build_kws_model(cfg.feature, cfg.model, num_classes=len(LABELS))
    config = {"feature": to_plain(cfg.feature), "model": to_plain(cfg.model)}
    module = KWSLightningModule(model, LABELS, optimizer=instantiate(cfg.optimizer), config=config)
    batch = (0.1 * torch.randn(4, 16000), torch.tensor([0, 1, 2, 3]))
    ema, weights = EMA(decay=0.5, warmup=False), RecordWeights()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best", monitor="val/acc", mode="max")
    trainer = make_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ema, weights, best])
    trainer.fit(module, train_dataloaders=loader(batch, 3), val_dataloaders=loader(batch, 1))

    average = ema.averaged_weights(module)
    raw = weights.after_step[-1]
    name = "net.classifier.weight"
    assert not torch.allclose(average[name], raw[name])
    torch.testing.assert_close(weights.in_validation[-1][name], average[name])

    saved = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    for key, tensor in average.items():
        torch.testing.assert_close(saved["state_dict"]["model." + key], tensor)
        torch.testing.assert_close(saved[RAW_WEIGHTS_KEY]["model." + key], raw[key])
    restored = KWSLightningModule.from_checkpoint(best.best_model_path)
    torch.testing.assert_close(restored.model.state_dict()[name], average[name])
    # train.py's trainer.test(ckpt_path=best) runs with the EMA callback attached (Lightning restores
    # callbacks for test too): it must score the average, as eval and export do, not the raw weights.
    trainer.test(module, dataloaders=loader(batch, 1), ckpt_path=best.best_model_path, verbose=False)
    torch.testing.assert_close(module.model.state_dict()[name], average[name])


def fit_with_ema(tmp_path: Path, max_steps: int, ckpt_path: str | None = None) -> dict:
    """Steps of 1 batch, epochs of 2, last.ckpt after every epoch; returns the final last.ckpt."""
    module = linear_module(lr=0.2)
    last = LastCheckpoint(dirpath=str(tmp_path))
    callbacks = [EMA(decay=0.9, warmup=True), last]
    batch = toy_batch()
    trainer = make_trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(
        module, train_dataloaders=loader(batch, 2), val_dataloaders=loader(batch, 1), ckpt_path=ckpt_path
    )
    return torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)


def test_resume_restores_raw_and_averaged_weights(tmp_path: Path) -> None:
    straight = fit_with_ema(tmp_path / "straight", max_steps=8)
    first = fit_with_ema(tmp_path / "first", max_steps=4)
    assert first["global_step"] == 4
    resumed = fit_with_ema(tmp_path / "second", max_steps=8, ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    assert resumed["global_step"] == 8
    # Interrupted at step 4 and resumed, the run ends where the uninterrupted one does: same raw weights
    # (training went on from the raw weights, not the average) and the same average (same update count).
    for key in ("model.weight", "model.bias"):
        torch.testing.assert_close(resumed["state_dict"][key], straight["state_dict"][key])
        torch.testing.assert_close(resumed[RAW_WEIGHTS_KEY][key], straight[RAW_WEIGHTS_KEY][key])
        assert not torch.allclose(straight["state_dict"][key], straight[RAW_WEIGHTS_KEY][key])
    state = next(v for k, v in resumed["callbacks"].items() if k.startswith("EMA"))
    assert state["num_updates"] == 8


def test_ema_refuses_weights_only_checkpoints(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    trainer = make_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[EMA(), checkpoint])
    with pytest.raises(ValueError, match="save_weights_only"):
        trainer.fit(linear_module(), train_dataloaders=loader(toy_batch(), 1))


# ---- SWA ---------------------------------------------------------------------------------------------------


class TinyBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, len(LABELS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_swa_config_averages_the_weights_and_adds_the_batchnorm_epoch(tmp_path: Path) -> None:
    cfg = compose_train(
        "callbacks=[swa]", "callbacks.swa.swa_epoch_start=2", "scheduler=cosine", "scheduler.warmup_steps=0"
    )
    (swa,) = instantiate_named(cfg.callbacks, "callbacks")
    torch.manual_seed(0)
    module = KWSLightningModule(
        TinyBNNet(), LABELS, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler)
    )
    starts: list[torch.Tensor] = []

    class RecordEpochStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            starts.append(pl_module.model.body[0].weight.detach().clone())

    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[RecordEpochStart(), swa])
    batch = toy_batch(size=16)
    trainer.fit(module, train_dataloaders=loader(batch, 4), val_dataloaders=loader(batch, 1))
    # 3 epochs + 1 without optimiser steps for the BatchNorm statistics of the averaged weights.
    # (Lightning counts one optimiser call without gradients at its end: 13 steps.)
    assert trainer.current_epoch == 4 and trainer.global_step == 13
    # swa_epoch_start=2: SWA averaged the weights at the starts of (0-based) epochs 1 and 2, and the model
    # ends with that mean.
    torch.testing.assert_close(module.model.body[0].weight, (starts[1] + starts[2]) / 2)


# ---- warm-up as a share of the run -------------------------------------------------------------------------


def test_cosine_warmup_fraction_counts_in_steps_of_the_run() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_cosine(optimizer, total_steps=200, warmup_fraction=0.025)  # BC-ResNet: 5 of 200 epochs
    lrs = []
    for _ in range(200):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:6] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 194 / 195)))
    with pytest.raises(ValueError, match="set one of them"):
        warmup_cosine(optimizer, total_steps=200, warmup_steps=10, warmup_fraction=0.1)


# ---- experiment recipes ------------------------------------------------------------------------------------

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
DEV_RECIPES = ["res8", "res15", "bc_resnet", "bc_resnet2", "tc_resnet", "matchboxnet", "ds_cnn", "best"]
FULL_RECIPES = [name for name in EXPERIMENTS if name.endswith("_full")]


@functools.cache
def _recipe(name: str) -> DictConfig:
    return compose_train(f"experiment={name}")


def recipe(name: str) -> DictConfig:
    """`experiment=<name>` as composed from the command line without other overrides (a private copy)."""
    return copy.deepcopy(_recipe(name))


def test_the_recipes_exist() -> None:
    assert set(DEV_RECIPES) <= set(EXPERIMENTS)
    assert {"bc_resnet_v1_full", "bc_resnet_v2_full", "matchboxnet_v1_full", "matchboxnet_v2_full"} <= set(
        FULL_RECIPES
    )


# Real-data recipes leave data.root to the user, except those defined on the dev set itself and the
# full-data recipes (data=speech_commands_v1 / _v2: the download folder under paths.data_dir).
DEFAULT_ROOT_RECIPES = {"feature_sweep": "../shared/data/speech_commands_dev"}


def full_recipe_version(name: str) -> str:
    """The Speech Commands version a `*_v1_full` / `*_v2_full` recipe trains on."""
    return "v0.02" if name.endswith("_v2_full") else "v0.01"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds(name: str, tmp_path: Path) -> None:
    """With data.root set, every interpolation resolves, the model builds and takes a clip, and the
    optimiser, schedule, knobs and callbacks the recipe names instantiate."""
    cfg = recipe(name)
    assert cfg.task_name == name
    if cfg.data.synthetic is None:  # a real-data recipe: the user says where the data is
        if name in DEFAULT_ROOT_RECIPES:
            assert cfg.data.root == DEFAULT_ROOT_RECIPES[name]
        elif name in FULL_RECIPES:
            version = full_recipe_version(name)
            assert cfg.data.root == f"{cfg.paths.data_dir}/speech_commands_{version}"
        else:
            assert OmegaConf.is_missing(cfg.data, "root")
        cfg.data.root = str(tmp_path)
    cfg.paths.output_dir = str(tmp_path)  # Hydra's run dir, which exists only under @hydra.main
    register_resolvers()
    OmegaConf.resolve(cfg)
    model = build_kws_model(cfg.feature, cfg.model, num_classes=12)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 16000)).shape == (1, 12)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    if cfg.scheduler:
        kwargs = {"total_steps": 1000} if cfg.scheduler.get("total_steps", 0) is None else {}
        instantiate(cfg.scheduler)(optimizer=optimizer, **kwargs)
    for group in ("loss", "spec_augment", "mixup", "vtlp"):
        if cfg.get(group):
            instantiate(cfg[group])
    instantiate_named(cfg.callbacks, "callbacks")


@pytest.mark.parametrize("name", DEV_RECIPES + FULL_RECIPES)
def test_speech_commands_recipes(name: str) -> None:
    cfg = recipe(name)
    assert cfg.data._target_.endswith("SpeechCommandsDataModule") and cfg.data.synthetic is None
    if name in FULL_RECIPES:  # data=speech_commands_v1 / _v2: data.download=true fetches the right version
        version = full_recipe_version(name)
        assert cfg.data.dataset == version and cfg.data.download is False
        assert cfg.data.root.endswith(f"/speech_commands_{version}")
    else:
        assert OmegaConf.is_missing(cfg.data, "root")
    if name in DEV_RECIPES:  # CPU budgets with every knob on
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_epochs > 0
        assert cfg.spec_augment._target_.endswith("SpecAugment")
        assert cfg.loss.label_smoothing == 0.1
        assert "ema" in cfg.callbacks
        assert cfg.scheduler._target_.endswith("warmup_cosine")
    else:  # the papers' recipes: no knob the paper did not use
        assert cfg.loss.label_smoothing == 0.0 and not cfg.mixup and "ema" not in cfg.callbacks


def test_bc_resnet_and_best_recipes() -> None:
    bc = compose_train("experiment=bc_resnet", "data.root=/data", "model.scale=3")
    assert bc.model.name == "bc_resnet" and bc.model.scale == 3.0
    assert bc.feature._target_.endswith("LogMel") and bc.feature.n_mels == 40
    bc2 = recipe("bc_resnet2")
    assert bc2.model.name == "bc_resnet" and bc2.model.scale == 2.0 and bc2.trainer.max_epochs == 25
    # best: the most accurate recipe measured on the dev set, TC-ResNet14-1.5 scored on its final weights.
    best = recipe("best")
    assert best.model.name == "tc_resnet14" and best.model.width_multiplier == 1.5
    assert best.test_weights == "last" and best.trainer.max_epochs == 100 and best.data.batch_size == 100
    full = recipe("bc_resnet_v2_full")
    assert full.task_name == "bc_resnet_v2_full" and full.trainer.accelerator == "gpu"
    assert full.trainer.max_epochs == 200 and full.data.batch_size == 100
    assert full.optimizer.lr == 0.1 and full.scheduler.warmup_fraction == 0.025


def test_best_balanced_swa_averages_with_swa_instead_of_the_ema() -> None:
    cfg = recipe("best_balanced_swa")
    assert cfg.data.balance_keywords is True and cfg.model.width_multiplier == 1.5
    assert cfg.callbacks.get("ema") is None  # SWA and EMA would both replace the weights
    assert cfg.callbacks.swa._target_.endswith("StochasticWeightAveraging")
    assert cfg.callbacks.swa.swa_lrs == 0.02 and cfg.callbacks.swa.swa_epoch_start == 0.75
    assert cfg.trainer.max_epochs == 100 and cfg.trainer.max_steps == -1  # SWA needs epochs
    assert cfg.test_weights == "last"  # the average, not an earlier best-validation checkpoint


@pytest.mark.parametrize("name", ["matchboxnet_v1_full", "matchboxnet_v2_full"])
def test_matchboxnet_full_recipes_follow_nemo(name: str) -> None:
    """NeMo's examples/asr/conf/matchboxnet/matchboxnet_3x1x64_v1.yaml (and _v2), key by key."""
    cfg = recipe(name)
    assert cfg.task_name == name and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.max_epochs == 200 and cfg.trainer.max_steps == -1 and cfg.data.batch_size == 128
    assert (
        cfg.model.name == "matchboxnet" and list(cfg.model.kernels) == [13, 15, 17] and cfg.model.repeat == 2
    )
    assert cfg.model.channels == 64 and cfg.model.dropout == 0.0
    assert cfg.optimizer._target_ == "kws_lightning.optim.NovoGrad"
    assert cfg.optimizer.lr == 0.05 and list(cfg.optimizer.betas) == [0.95, 0.5]
    assert cfg.optimizer.weight_decay == 1e-3
    sched = cfg.scheduler
    assert sched._target_.endswith("warmup_hold_poly") and sched.total_steps is None
    assert (sched.warmup_fraction, sched.hold_fraction, sched.power, sched.min_lr) == (0.05, 0.45, 2.0, 1e-3)
    feature = cfg.feature
    assert feature._target_.endswith("MFCC") and feature.n_mfcc == feature.n_mels == 64
    assert (feature.n_fft, feature.hop_length, feature.fmin, feature.fmax) == (400, 160, 0.0, 8000.0)
    augment = AugmentConfig.from_mapping(cfg.augment)
    assert augment.time_shift.enabled and augment.time_shift.p == 1.0
    assert int(augment.time_shift.max_fraction * 16000) == 80  # +-5 ms
    assert not augment.noise.enabled  # no background-noise mix in NeMo's recipe
    assert augment.white_noise.enabled and augment.white_noise.p == 1.0
    assert (augment.white_noise.min_db, augment.white_noise.max_db) == (-90.0, -46.0)
    spec = instantiate(cfg.spec_augment)
    assert (spec.freq_masks, spec.freq_width, spec.time_masks, spec.time_width) == (2, 15, 2, 25)
    assert (spec.rect_masks, spec.rect_time, spec.rect_freq, spec.mask_value) == (5, 25, 15, 0.0)
    assert cfg.loss.label_smoothing == 0.0 and not cfg.mixup and "ema" not in cfg.callbacks


class RecordStep(Callback):
    """The lr of every optimiser step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_matchboxnet_full_recipe_trains_on_cpu(tmp_path: Path) -> None:
    """The recipe's own objects (front end, model, NovoGrad, schedule, SpecAugment with rectangles, the
    white-noise input path, its Trainer config with trainer=cpu) take two training steps on random clips."""
    cfg = compose_train("experiment=matchboxnet_v1_full", "trainer=cpu", "trainer.max_steps=2")
    cfg.paths.output_dir = str(tmp_path)
    labels = make_labels(DEFAULT_KEYWORDS)
    model = build_kws_model(cfg.feature, cfg.model, num_classes=len(labels))
    assert count_parameters(model) == 90_444  # as kws_lightning/models/matchboxnet.py states for 64 MFCCs
    spec_augment = instantiate(cfg.spec_augment)
    module = KWSLightningModule(
        model,
        labels,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        loss=instantiate(cfg.loss),
        spec_augment=spec_augment,
    )
    # The training input path: centred clips, +-5 ms shift, white noise (the noise bank stays unused).
    torch.manual_seed(0)
    clips = (torch.randn(8, 16000) * 3000).to(torch.int16)
    waves = prepare_batch(
        clips,
        torch.full((8,), 16000),
        torch.zeros(8, dtype=torch.bool),
        NoiseBank([torch.zeros(16000, dtype=torch.int16)]),
        AugmentConfig.from_mapping(cfg.augment),
        train=True,
    )
    batch = (waves, torch.arange(8) % len(labels))
    record = RecordStep()
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[record],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    assert trainer.precision == "32-true"
    masked: list[tuple[tuple[int, ...], float]] = []  # (shape, share of zeroed cells) per SpecAugment call
    spec_augment.register_forward_hook(
        lambda _m, _i, out: masked.append((tuple(out.shape), (out == 0).float().mean().item()))
    )
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer.fit(module, train_dataloaders=loader(batch, 2))
    assert trainer.global_step == 2
    assert isinstance(trainer.optimizers[0], NovoGrad)
    # total_steps = 2 from the trainer: no warm-up or hold steps (int(0.1), int(0.9)), then the decay.
    assert record.lrs == pytest.approx([0.05, 1e-3 + 0.049 * 0.5**2])
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert [shape for shape, _ in masked] == [(8, 1, 101, 64)] * 2  # 64 MFCCs x 101 frames, masked
    assert all(share > 0.05 for _, share in masked)
    changed = [name for name, p in module.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)  # every weight moved (NovoGrad's weight decay alone would do that)


@pytest.mark.slow
def test_fast_dev_run_of_the_bc_resnet_recipe_on_synthetic_data(
    tmp_path: Path, synthetic_overrides: list[str], run_cli
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "experiment=bc_resnet",
        *synthetic_overrides,
        *FAST,
        "trainer.fast_dev_run=true",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    summary = result.stdout.strip().splitlines()[-3]
    assert summary.startswith("final metrics:") and "test/acc" in summary
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.model.name == "bc_resnet" and saved.spec_augment.freq_masks == 2
    assert saved.loss.label_smoothing == 0.1 and "ema" in saved.callbacks
    assert math.isfinite(float(summary.split("test/loss ")[1].split()[0]))
