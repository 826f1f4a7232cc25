"""EMA: an exponential moving average of the model's weights, for validation, test and the checkpoints."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

# Top-level checkpoint key holding the raw (trained, not averaged) weights, for resuming.
RAW_WEIGHTS_KEY = "ema_raw_state_dict"


class EMA(Callback):
    """Keeps ema <- d ema + (1 - d) w after every optimiser step, for every weight and floating buffer
    (BatchNorm statistics included) of ``pl_module.<attribute>`` (the `KWSModel`); integer buffers are
    copied. The average starts from the weights at the start of training.

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
    ExponentialMovingAverage with num_updates): early on, the average covers about the last n / 9 steps
    rather than dragging the random initialisation along, so short runs get a useful average too;
    `decay` caps the window at about 1 / (1 - decay) steps in long runs.

    Where the averaged weights are used:
      * validation runs on them (swapped in for the epoch, swapped back after), so val/acc, the best
        checkpoint and early stopping all judge the averaged model;
      * every checkpoint's ``state_dict`` holds them: eval, predict, export and `trainer.test(ckpt_path=...)`
        load the averaged model with no EMA-specific code. The raw weights go under ``ema_raw_state_dict``,
        so that resuming (``ckpt_path=...``) restores the raw weights to train on and the average to
        continue from, together with the update count;
      * after training the module holds the averaged weights (e.g. for a test without a checkpoint).

    Checkpoints written with ``save_weights_only=True`` skip callbacks, so they would hold raw weights: that
    combination is refused.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, attribute: str = "model") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay!r} (e.g. 0.999)")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.attribute = attribute
        self.num_updates = 0
        self._ema: dict[str, torch.Tensor] | None = None
        self._last_step = 0  # trainer.global_step at the last update
        self._swapped = False  # the module holds the averaged weights, self._ema the raw ones
        self._swapped_for_validation = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, warmup=self.warmup, attribute=self.attribute)

    def decay_at(self, num_updates: int) -> float:
        """The decay of update number `num_updates` + 1."""
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

    def averaged_weights(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The averaged weights (names as in ``pl_module.<attribute>.state_dict()``), detached copies."""
        if self._ema is None:
            raise RuntimeError("EMA has no average yet: it starts when fitting starts")
        source = self._live(pl_module) if self._swapped else self._ema
        return {name: tensor.detach().clone() for name, tensor in source.items()}

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(getattr(pl_module, self.attribute, None), torch.nn.Module):
            raise ValueError(
                f"callbacks.ema.attribute={self.attribute!r}: the LightningModule has no such sub-module"
            )
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_weights_only:
                raise ValueError(
                    "the EMA callback cannot put the averaged weights into save_weights_only checkpoints "
                    "(Lightning skips callbacks when writing them): set save_weights_only=false"
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup(): the module is now on its device, and a resumed average has been loaded.
        live = self._live(pl_module)
        if self._ema is None:
            self._ema = {name: tensor.detach().clone() for name, tensor in live.items()}
        else:
            self._ema = {name: self._ema[name].to(live[name]) for name in live}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation, only batches that ended in an optimiser step update the average.
        if self._ema is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        weight = 1.0 - self.decay_at(self.num_updates)
        with torch.no_grad():
            for name, tensor in self._live(pl_module).items():
                average = self._ema[name]
                if average.is_floating_point():
                    average.lerp_(tensor, weight)
                else:
                    average.copy_(tensor)
        self.num_updates += 1

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swapped_for_validation = self._ema is not None and not self._swapped
        if self._swapped_for_validation:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped_for_validation:
            self._swap(pl_module)
            self._swapped_for_validation = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Swapped, not copied: a checkpoint written after this (last.ckpt's tail) still gets the raw weights.
        if self._ema is not None and not self._swapped:
            self._swap(pl_module)

    # ---- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self._last_step = int(state_dict["last_step"])

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._ema is None:
            return
        live = self._live(pl_module)
        raw, averaged = (self._ema, live) if self._swapped else (live, self._ema)
        prefix = self.attribute + "."
        state = checkpoint["state_dict"]
        checkpoint[RAW_WEIGHTS_KEY] = {prefix + name: raw[name].detach().clone() for name in raw}
        for name, tensor in averaged.items():
            state[prefix + name] = tensor.detach().clone()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this after loading checkpoint["state_dict"] (the averaged weights) into the
        # module, for fit and also for test/validate/predict. Only a resumed fit puts the raw weights back
        # to train on; otherwise the average stays, so trainer.test(ckpt_path=...) scores what eval and
        # export score.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        module = getattr(pl_module, self.attribute)
        self._ema = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        self._swapped = False
        raw = checkpoint.get(RAW_WEIGHTS_KEY)
        if raw is None:
            rank_zero_warn(
                "the checkpoint was written without the EMA callback: the average starts from its weights"
            )
            return
        prefix = self.attribute + "."
        module.load_state_dict({name[len(prefix) :]: tensor for name, tensor in raw.items()})

    # ---- helpers -----------------------------------------------------------------------------------------

    def _live(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The module's persistent weights and buffers, sharing storage with it (in-place ops change it)."""
        return getattr(pl_module, self.attribute).state_dict()

    def _swap(self, pl_module: pl.LightningModule) -> None:
        assert self._ema is not None
        with torch.no_grad():
            for name, tensor in self._live(pl_module).items():
                held = tensor.clone()
                tensor.copy_(self._ema[name])
                self._ema[name].copy_(held)
        self._swapped = not self._swapped
