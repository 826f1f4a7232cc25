"""The LightningModule: loss, accuracy, optimiser and schedule; the model itself is `KWSModel`.

Training-only recipe knobs live in their own files and are handed in ready-made: `SpecAugment`
(kws_lightning/spec_augment.py, between the front end and the network), `Mixup` (kws_lightning/mixup.py,
on the waves and targets), `VTLP` (kws_lightning/vtlp.py, inside the front end), the training loss
(conf/loss/, e.g. label smoothing), distillation `Teachers` (kws_lightning/distill.py). Weight averaging
(EMA, SWA) are callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kws_lightning.distill import Teachers
from kws_lightning.features import float32_dfts, takes_bank_warp
from kws_lightning.mixup import Mixup
from kws_lightning.vtlp import VTLP

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., Any]


class KWSLightningModule(pl.LightningModule):
    """Trains a `KWSModel` (front end + network, raw 16 kHz audio in, logits out).

    `optimizer` and `scheduler` are factories (Hydra `_partial_: true`): the optimiser takes the
    parameters, the scheduler the optimiser, and `total_steps` too where its config leaves it null
    (filled from `trainer.estimated_stepping_batches`). Every schedule is stepped once per optimiser step.

    `labels` (class names by index), `config` (the resolved run config, plain containers), `sample_rate`
    and `clip_samples` (what the model expects as input) go into the checkpoint's hyper-parameters so a
    checkpoint alone rebuilds the model and names its outputs.

    Training only: `loss` (default plain cross-entropy; e.g. ``nn.CrossEntropyLoss(label_smoothing=0.1)``),
    `spec_augment` (a module on the features, applied as frontend -> spec_augment -> net, so the model,
    its checkpoints and exports never contain it; needs the model's `frontend` and `net`) and `mixup`
    (training accuracy is then measured against each mixed clip's dominant label); `vtlp` warps the
    front end's filter bank along frequency (needs a mel front end: MFCC, log-mel); `teachers` add the
    distillation term to the training loss (kws_lightning/distill.py). Validation and test
    always report the plain cross-entropy of the unaugmented model, comparable across recipes.
    """

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str],
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        config: Mapping[str, Any] | None = None,
        sample_rate: int = 16000,
        clip_samples: int = 16000,
        loss: nn.Module | None = None,
        spec_augment: nn.Module | None = None,
        mixup: Mixup | None = None,
        teachers: Teachers | None = None,
        vtlp: VTLP | None = None,
    ) -> None:
        super().__init__()
        # The modules and factories are rebuilt from `config`; saving them would pickle code objects.
        self.save_hyperparameters(
            ignore=["model", "optimizer", "scheduler", "loss", "spec_augment", "mixup", "teachers", "vtlp"]
        )
        # Plain containers only: checkpoints are opened with weights_only=True (kws_lightning.checkpoints).
        self.hparams["labels"] = [str(label) for label in labels]
        if isinstance(config, DictConfig):
            self.hparams["config"] = OmegaConf.to_container(config, resolve=True)
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_criterion = loss if loss is not None else nn.CrossEntropyLoss()
        self.spec_augment = spec_augment
        self.mixup = mixup
        self.vtlp = vtlp
        # A plain attribute, not a submodule: checkpoints, EMA / SWA copies and exports hold the student only.
        self.teachers = teachers
        if spec_augment is not None and not (hasattr(model, "frontend") and hasattr(model, "net")):
            raise ValueError(
                "spec_augment needs a model with `frontend` and `net` (a KWSModel) to mask the features "
                f"between them; got {type(model).__name__}"
            )
        if vtlp is not None and not takes_bank_warp(getattr(model, "frontend", None)):
            frontend = type(getattr(model, "frontend", model)).__name__
            raise ValueError(
                f"vtlp warps a mel front end's power spectrum (feature=mfcc or feature=logmel); this model's "
                f"front end is {frontend}: drop vtlp (vtlp=none) or change the feature"
            )

        num_classes = len(labels)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Persistent so a resumed run remembers its best validation accuracy.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)

    @property
    def labels(self) -> list[str]:
        return list(self.hparams["labels"])

    def setup(self, stage: str) -> None:
        # feature.normalize=dataset: estimate the statistics when fitting starts, after a resumed checkpoint
        # is loaded and before EMA / SWA copy the weights (kws_lightning/feature_stats.py).
        if stage == "fit":
            from kws_lightning.feature_stats import FeatureStatistics

            FeatureStatistics.attach(self.trainer, self.model)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return self.model(waves)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        waves, targets = batch
        logits = self(waves)
        return F.cross_entropy(logits, targets), logits.argmax(dim=1)

    def _training_logits(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, the front end's features before SpecAugment, or None for a model without one)."""
        frontend, net = getattr(self.model, "frontend", None), getattr(self.model, "net", None)
        if frontend is None or net is None:
            return self(waves), None
        # = self.model(waves) when SpecAugment and VTLP are off (KWSModel.forward), with float32 DFTs
        with float32_dfts(frontend):
            features = frontend(waves) if self.vtlp is None else frontend(waves, bank_warp=self.vtlp)
        return net(features if self.spec_augment is None else self.spec_augment(features)), features

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        waves, targets = batch
        if self.mixup is not None:
            mixed = self.mixup(waves, targets)
            waves = mixed.waves
            logits, features = self._training_logits(waves)
            loss = mixed.loss(self.train_criterion, logits)
            targets = mixed.dominant_targets
        else:
            logits, features = self._training_logits(waves)
            loss = self.train_criterion(logits, targets)
        if self.teachers is not None:
            # The teachers see the student's input (augmented, mixed), without SpecAugment; a teacher with
            # the student's front end reuses its features.
            frontend = getattr(self.model, "frontend", None)
            loss, soft_loss = self.teachers.loss(waves, logits, loss, features, frontend)
            self.log("train/loss_distill", soft_loss, on_step=True, on_epoch=False)
        preds = logits.argmax(dim=1)
        batch_acc = self.train_acc(preds, targets)
        self.train_loss(loss, weight=len(preds))
        # Per-step values under the plain names, epoch means under *_epoch (one tag each in TensorBoard).
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", batch_acc, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc_epoch", self.train_acc, on_step=False, on_epoch=True)
        return {"loss": loss, "preds": preds.detach(), "targets": targets}

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        loss, preds = self._shared_step(batch)
        self.val_loss(loss, weight=len(preds))
        self.val_acc(preds, batch[1])
        return {"loss": loss, "preds": preds, "targets": batch[1]}

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", acc, prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
        # The sanity check runs on an untrained model over two batches: it must not count as a best.
        if not self.trainer.sanity_checking:
            self.val_acc_best(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, preds = self._shared_step(batch)
        self.test_loss(loss, weight=len(preds))
        self.test_acc(preds, batch[1])
        return {"loss": loss, "preds": preds, "targets": batch[1]}

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute())
        self.log("test/acc", self.test_acc.compute())
        self.test_loss.reset()
        self.test_acc.reset()

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(
                "KWSLightningModule has no optimizer: pass optimizer=partial(torch.optim.SGD, lr=...)"
            )
        optimizer = self.optimizer_factory(params=self._param_groups())
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        keywords = getattr(self.scheduler_factory, "keywords", {})
        if keywords.get("total_steps", 0) is None:
            kwargs["total_steps"] = self._total_steps()
        if isinstance(keywords.get("max_lr"), int | float):  # OneCycleLR would give every group one peak
            kwargs["max_lr"] = [keywords["max_lr"] * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> Any:
        """The parameters, in one group; a submodule with a `param_group_lr_scale` (a fine-tuned speech
        embedding, kws_lightning/speech_embedding.py) gets its own group at that share of the rate."""
        scaled = [
            (m, m.param_group_lr_scale)
            for m in self.model.modules()
            if getattr(m, "param_group_lr_scale", None) is not None
        ]
        if not scaled:
            return self.parameters()
        taken = {id(p) for m, _ in scaled for p in m.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in taken]}]
        return groups + [{"params": list(m.parameters()), "lr_scale": scale} for m, scale in scaled]

    def _total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"the scheduler needs the run's length in steps, but the trainer estimates {total}: "
                "set trainer.max_steps or trainer.max_epochs"
            )
        return int(total)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> KWSLightningModule:
        """Rebuild the module (model, labels, config) from a checkpoint written by `kws_lightning.train`.

        Opened as data and rebuilt through the registries (`kws_lightning.checkpoints`), as inference does:
        a checkpoint that carries code, or a config naming anything else, is a `CheckpointError`.
        """
        from kws_lightning.checkpoints import build_checkpoint_model, load_checkpoint

        checkpoint = load_checkpoint(path, map_location=map_location)
        model, hparams = build_checkpoint_model(checkpoint, path)
        config = hparams["config"]
        module = cls(
            model=model,
            labels=hparams["labels"],
            config=config,
            sample_rate=hparams["sample_rate"],
            clip_samples=hparams["clip_samples"],
        )
        module.load_state_dict(checkpoint["state_dict"])
        return module
