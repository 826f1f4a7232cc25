"""Estimate ``feature.normalize=dataset`` statistics once, at fit start, from the training clips.

`FeatureStatistics` is a callback the LightningModule puts first in the trainer's list when a fit starts
(`KWSLightningModule.setup`): its ``on_fit_start`` runs after a resumed checkpoint has been loaded (whose
statistics are then kept: never re-estimated) and before other callbacks copy the weights (EMA, SWA), so
they copy the estimated statistics.

The clips go through the real input path, unaugmented: the first `num_clips` items of the training
sampler's epoch-0 draw (keywords, unknown words and silence in the training proportions), centre-padded
as validation clips are; silence items are synthesised from the background noise as in training, with a
fixed seed. The per-bin mean and std are taken over every frame of every clip, in float64. Every DDP
process draws the same clips, so all get the same statistics without communication.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from kws_lightning.feature_norm import FeatureNorm

log = logging.getLogger(__name__)

# A few thousand clips: per-bin means settle to ~1 % of a std well before that; ~5 s of MFCC on one CPU core.
DEFAULT_NUM_CLIPS = 3000
BATCH = 250


def pending_norms(model: nn.Module) -> list[FeatureNorm]:
    """The ``dataset`` normalisers inside `model` whose statistics are not estimated or loaded yet."""
    return [sub for sub in model.modules() if isinstance(sub, FeatureNorm) and sub.needs_statistics]


def statistics_waves(datamodule: Any, num_clips: int) -> Iterator[torch.Tensor]:
    """Unaugmented training waves (B, clip_samples), on the CPU, from a `SpeechCommandsDataModule`."""
    from kws_lightning.data.augment import synthesize_silence
    from kws_lightning.data.dataset import ClipBatches

    sampler = getattr(datamodule, "train_sampler", None)
    if sampler is None or not hasattr(datamodule, "to_model_input"):
        raise ValueError(
            "feature.normalize=dataset estimates its statistics from a SpeechCommandsDataModule's training "
            f"clips, got {type(datamodule).__name__}: use that data module, set the statistics yourself "
            "(FeatureNorm.set_statistics), or choose feature.normalize=per_utterance"
        )
    items = sampler.epoch_items(0)[:num_clips]
    clips = ClipBatches(datamodule.cache, datamodule.clip_targets())
    # Seeded and isolated: the run's own random stream is the same with or without this estimate.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(datamodule.hparams.seed))
        for start in range(0, len(items), BATCH):
            batch = clips.__getitems__(items[start : start + BATCH].tolist())
            waves = datamodule.to_model_input(batch, train=False)  # centred pad/crop, no augmentation
            silence = batch["synth_silence"]
            if silence.any():
                waves[silence] = synthesize_silence(
                    int(silence.sum()), datamodule.noise, datamodule.augment.silence
                )
            yield waves


@torch.no_grad()
def estimate_statistics(frontend: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set the per-bin mean and std of `frontend`'s features over `batches` into its pending ``norm``
    (still the identity, so the front end's output is the raw features); the number of clips used."""
    norm = frontend.norm
    if not norm.needs_statistics:
        raise ValueError("these statistics are already estimated or loaded")
    device = norm.mean.device
    total, total_sq, frames, clips = 0.0, 0.0, 0, 0
    for waves in batches:
        features = frontend(waves.to(device)).double()  # (B, 1, T, F)
        flat = features.reshape(-1, features.shape[-1])
        total = total + flat.sum(dim=0)
        total_sq = total_sq + flat.square().sum(dim=0)
        frames += flat.shape[0]
        clips += len(waves)
    if clips == 0:
        raise ValueError("no training clips to estimate the feature statistics from")
    mean = total / frames
    std = (total_sq / frames - mean.square()).clamp_min(0.0).sqrt()
    norm.set_statistics(mean.to(norm.mean), std.to(norm.std))
    return clips


class FeatureStatistics(Callback):
    """Estimates the model's pending ``dataset`` feature statistics when fitting starts (see module doc)."""

    def __init__(self, num_clips: int = DEFAULT_NUM_CLIPS) -> None:
        self.num_clips = num_clips

    @classmethod
    def attach(cls, trainer: pl.Trainer, model: nn.Module) -> None:
        """Put one instance first in `trainer`'s callbacks if `model` has statistics to estimate."""
        if not pending_norms(model) or any(isinstance(c, cls) for c in trainer.callbacks):
            return
        trainer.callbacks.insert(0, cls())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        # The front ends (modules whose `norm` child is pending); none when a resumed checkpoint held them.
        frontends = [m for m in model.modules() if isinstance(getattr(m, "norm", None), FeatureNorm)]
        frontends = [m for m in frontends if m.norm.needs_statistics]
        for frontend in frontends:
            started = time.perf_counter()
            was_training = frontend.training
            frontend.eval()
            try:
                clips = estimate_statistics(frontend, statistics_waves(trainer.datamodule, self.num_clips))
            finally:
                frontend.train(was_training)
            log.info(
                "feature statistics (normalize=dataset) from %d training clips in %.1f s",
                clips,
                time.perf_counter() - started,
            )
