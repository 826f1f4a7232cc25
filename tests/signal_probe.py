"""A test-only callback that holds a training run at a chosen step until the test has sent it a signal.

Added to a `python -m kws_lightning.train` subprocess with
``+callbacks.hold._target_=signal_probe.HoldAtStep`` (tests/ on PYTHONPATH): at `step` it writes
`<out_dir>/reached` and waits (at most `timeout_s`) for `<out_dir>/release`. The test sends SIGTERM or SIGINT,
then creates `release`: the signal lands at a known step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class HoldAtStep(Callback):
    def __init__(self, step: int, out_dir: str, timeout_s: float = 60.0) -> None:
        self.step, self.out_dir, self.timeout_s = int(step), Path(out_dir), float(timeout_s)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "reached").write_text(str(self.step))
        deadline = time.monotonic() + self.timeout_s
        while not (self.out_dir / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
