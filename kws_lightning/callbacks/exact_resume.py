"""Resume exactly: the random generators' states in every checkpoint, restored on resume, and the training
loader's position restored even when the schedule sized itself from the loader first.

Seeding at start-up (`seed=`) makes two fresh runs identical, but a resumed run would re-seed and so draw
from the start of every stream again (augmentation, SpecAugment masks, mixup pairs, dropout). Stored as plain
data (tensors, ints, lists, dicts) so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from kws_lightning.utils.lightning_private import restore_loader_position, train_loaders

# Top-level checkpoint key: one entry per process (DDP ranks draw their own augmentation).
RNG_STATES_KEY = "rng_states"


def collect_rng_states() -> dict[str, Any]:
    """This process's generators: torch (CPU and every CUDA device in use), numpy's global, Python's."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(numpy_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(numpy_state["state"]["key"], dtype=np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": {"version": int(version), "state": list(mt_state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what `collect_rng_states` returned."""
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


class ExactResume(Callback):
    """Saves every process's generator states into each checkpoint; on resume, restores them and the training
    loader's mid-epoch position, when training starts (after the sanity check, before the first batch).

    The loader position: Lightning restores it when it builds the training loader after loading the
    checkpoint, but a schedule that asks for the run's length (`trainer.estimated_stepping_batches`, e.g. the
    cosine schedule's total_steps) builds the loader earlier, and the resumed epoch would then start from its
    first batch again. The training loader also gets a generator of its own: each epoch's iterator draws a
    seed from it, not from torch's global generator, which would be one draw off after a mid-epoch resume.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_loader_position(trainer)
        for loader in train_loaders(trainer):
            if getattr(loader, "generator", None) is None:
                loader.generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63)
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        mine = collect_rng_states()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process writes a checkpoint together (rank 0 stores it), so gathering here is collective.
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            checkpoint[RNG_STATES_KEY] = gathered
        else:
            checkpoint[RNG_STATES_KEY] = [mine]

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        states = checkpoint.get(RNG_STATES_KEY)
        if not states:
            rank_zero_warn(
                "the checkpoint holds no random generator states (written before they were saved): "
                "the resumed run draws its augmentation from fresh seeds"
            )
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds random states of {len(states)} process(es), this run has "
                f"{trainer.world_size}: process i takes state i mod {len(states)}"
            )
        self._pending = states[trainer.global_rank % len(states)]
