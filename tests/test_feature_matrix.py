"""Every registered model trains on every front end (issue 11): a few SGD steps on a small synthetic batch,
with each feature's default normalisation, through the LightningModule; the loss must fall and stay finite.

Narrow widths and no dropout keep it fast (~1.5 s a pair on one thread) and its loss readable; the
networks' structure is unchanged.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, compose_train, make_trainer

from kws_lightning.models import available_models
from kws_lightning.models.registry import hyperparameters
from kws_lightning.module import KWSLightningModule
from kws_lightning.utils.instantiate import build_kws_model

FEATURES = ("mfcc", "logmel", "logspec")
NUM_CLASSES = 6
STEPS = 12
# The user's sweep's higher learning rate (SGD, momentum 0.9), at which unnormalised log-mel diverged.
LR = 0.01
NARROW = {
    "cnn_trad_pool2": ["model.n_feature_maps=8"],
    "res15": ["model.n_feature_maps=8", "model.n_layers=5"],
    "res8": ["model.n_feature_maps=8"],
    "res8_narrow": ["model.n_feature_maps=8"],
    "ds_cnn": ["model.channels=[16,16,16,16,16]"],
    "tc_resnet8": ["model.width_multiplier=0.5"],
    "tc_resnet14": ["model.width_multiplier=0.5"],
    "matchboxnet": [
        "model.channels=16",
        "model.prologue_channels=16",
        "model.epilogue_channels=16",
        "model.final_channels=16",
    ],
}
# BC-ResNet's SubSpectralNorm splits every stage's bins into 5 sub-bands: 81 log-spectrogram bins do not
# divide (the model says so); one band is plain BatchNorm, the only way it takes 81 bins.
PAIR_OVERRIDES = {("bc_resnet", "logspec"): {"sub_bands": 1}}


def synthetic_batch(per_class: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1 s clips: class k is a gliding tone around 300 + 250 k Hz with a syllable-like envelope, in noise
    at a random level (so the classes differ in spectrum, not in loudness)."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000.0
    waves, targets = [], []
    for k in range(NUM_CLASSES):
        for _ in range(per_class):
            f0 = 300.0 + 250.0 * k + rng.uniform(-30, 30)
            phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.2 * t)) / 16000.0
            start = rng.uniform(0.1, 0.5)
            envelope = np.exp(-(((t - start - 0.2) / 0.12) ** 2))
            gain = 10 ** rng.uniform(-2, -0.5)
            wave = gain * (envelope * np.sin(phase) + 0.05 * rng.standard_normal(t.size))
            waves.append(wave)
            targets.append(k)
    return torch.tensor(np.stack(waves), dtype=torch.float32), torch.tensor(targets)


class LossHistory(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@functools.cache
def model_configs() -> dict[str, object]:
    return {name: compose_train(f"model={name}", *NARROW.get(name, [])).model for name in available_models()}


def test_every_registered_model_has_a_config() -> None:
    # A model added to the registry without conf/model/<name>.yaml would silently drop out of the matrix.
    assert set(model_configs()) == set(available_models())


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("name", available_models())
def test_model_trains_on_feature(name: str, feature: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    feature_cfg = compose_train(f"feature={feature}").feature
    assert feature_cfg.normalize == "per_utterance"  # the default under test
    model_cfg = model_configs()[name].copy()
    model_cfg.update(PAIR_OVERRIDES.get((name, feature), {}))
    if "dropout" in hyperparameters(name):
        model_cfg.dropout = 0.0  # dropout's noise on a 12-clip batch can hide a falling loss
    model = build_kws_model(feature_cfg, model_cfg, NUM_CLASSES)
    module = KWSLightningModule(
        model=model,
        labels=[f"c{k}" for k in range(NUM_CLASSES)],
        optimizer=functools.partial(torch.optim.SGD, lr=LR, momentum=0.9),
    )
    history = LossHistory()
    loader = DataLoader(RepeatBatch(synthetic_batch(), STEPS), batch_size=None)
    make_trainer(tmp_path, max_steps=STEPS, callbacks=[history]).fit(module, train_dataloaders=loader)

    losses = history.losses
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first, f"{name} + {feature}: loss {first:.3f} -> {last:.3f} ({losses})"
