"""A training job inside a Hydra multirun: its name for TensorBoard, and DDP jobs in a process of their own.

Hydra's basic launcher runs a sweep's jobs one after another in one process. That is fine for one-process
jobs, but Lightning starts a DDP job's other processes by re-running the command line (here the whole
`-m` sweep) and leaves the process group and launcher environment behind for the next job. So a sweep job
that Lightning would launch that way runs as a plain single run of its own (`run_in_fresh_process`), in
the job's output folder, with the job's overrides.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# The sweep job's name, handed to a job re-run in a fresh process (which is a single run to Hydra).
SWEEP_JOB_ENV = "KWS_SWEEP_JOB_NAME"
RESOLVER = "kws.sweep_job_name"
MAX_NAME_CHARS = 200  # file names are limited to 255 bytes
# Command-line Hydra overrides that concern the sweep, not the job: a fresh single run must not get them.
_SWEEP_ONLY_HYDRA_KEYS = ("hydra.mode", "hydra.sweep", "hydra.sweeper", "hydra.launcher", "hydra.run")
_SWEEP_ONLY_HYDRA_GROUPS = ("hydra/sweeper", "hydra/launcher")


def is_multirun() -> bool:
    """True inside a job of `python -m kws_lightning.train -m ...` (or an `hparams_search=` sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweeper_needs_value() -> bool:
    """True in a sweep whose sweeper reads the value each job returns (Optuna's; the grid sweeper doesn't)."""
    if not is_multirun():
        return False
    from hydra.core.hydra_config import HydraConfig

    target = str(HydraConfig.get().sweeper.get("_target_") or "")
    return not target.endswith("BasicSweeper")


def swept_keys() -> set[str]:
    """The keys this sweep varies: `hydra.sweeper.params` (Optuna's search space, or the basic sweeper's) and
    the command line's sweep overrides (``optimizer.lr=0.01,0.001``), which the basic sweeper saves in
    `<sweep dir>/multirun.yaml` before the first job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = HydraConfig.get()
    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        command_line = list(OmegaConf.load(saved).hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(command_line)
        keys |= {override.key_or_group for override in parsed if override.is_sweep_override()}
    return keys


def sweep_job_name() -> str:
    """A sweep job's name for its TensorBoard run: the values of the swept keys (``feature=logmel,
    optimizer.lr=0.01``); '' outside sweeps.

    When the swept keys cannot be told (no `multirun.yaml`, no `hydra.sweeper.params`), Hydra's
    `override_dirname`: the job's overrides but ``hydra.job.config.override_dirname.exclude_keys``.
    '/' in values becomes '_' so the name stays one folder.
    """
    if SWEEP_JOB_ENV in os.environ:
        return os.environ[SWEEP_JOB_ENV]
    if not is_multirun():
        return ""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = HydraConfig.get()
    keys = swept_keys()
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    swept = sorted((o.key_or_group, _short(o.value())) for o in parsed if o.key_or_group in keys)
    name = ",".join(f"{key}={value}" for key, value in swept) if swept else hydra_cfg.job.override_dirname
    return name.replace("/", "_")[:MAX_NAME_CHARS]


def _short(value: Any) -> str:
    # Optuna's samples (0.0003287798945394786) read better, and still differ, at 4 significant digits.
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register_resolvers() -> None:
    """`${kws.sweep_job_name:}` for the configs (conf/logger/tensorboard.yaml names each job's run by it)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, sweep_job_name)


@contextmanager
def _quiet(logger_names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def launches_own_processes(trainer_cfg: DictConfig) -> bool:
    """Whether Lightning would start this trainer's other processes itself by re-running the command line.

    Decided by Lightning's own accelerator/strategy resolution on a throwaway Trainer (``devices=2`` with
    ``strategy=auto`` on GPUs is DDP too). Under SLURM or torchrun the processes exist already: False.
    """
    from hydra.utils import instantiate

    from kws_lightning.utils.lightning_private import reruns_command_for_processes

    with _quiet(["pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"]):
        trainer = instantiate(trainer_cfg, logger=False, callbacks=[], enable_checkpointing=False)
    return reruns_command_for_processes(trainer)


def _job_only(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return not (key.startswith(_SWEEP_ONLY_HYDRA_KEYS) or key.startswith(_SWEEP_ONLY_HYDRA_GROUPS))


def fresh_process_command(module: str, output_dir: str | os.PathLike) -> list[str]:
    """`python -m <module> <this job's overrides>` as a single run writing into `output_dir`."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides
    hydra_overrides = [item for item in overrides.hydra if _job_only(item)]
    return [
        sys.executable,
        "-m",
        module,
        *overrides.task,
        *hydra_overrides,
        f"hydra.run.dir={Path(output_dir).resolve()}",
        "hydra.mode=RUN",
        # The sweep job already wrote .hydra/ (config, overrides) into this folder.
        "hydra.output_subdir=null",
    ]


def run_in_fresh_process(module: str, output_dir: str | os.PathLike) -> int:
    """Run this sweep job as a single run in a new process (output streams through); its exit code."""
    from hydra.utils import get_original_cwd

    command = fresh_process_command(module, output_dir)
    log.info("multi-process job: running it in a fresh process: %s", " ".join(command[1:]))
    env: dict[str, Any] = {**os.environ, SWEEP_JOB_ENV: sweep_job_name()}
    # stdout/stderr are not captured: the job's progress shows as it runs; errors go to job_result.json.
    # A session of its own, so Ctrl+C reaches it once, from here: the job saves last.ckpt and records itself
    # as interrupted (kws_lightning/callbacks/stop_on_signal.py) before this process goes on.
    process = subprocess.Popen(command, env=env, cwd=get_original_cwd(), start_new_session=True)
    with _forward_signals(process):
        return process.wait()


def _forward_signals(process: subprocess.Popen) -> AbstractContextManager[None]:
    """SIGINT/SIGTERM sent to this process go to `process` instead (which then ends on its own)."""
    import signal

    from kws_lightning.utils.signals import handling_signals

    def forward(signum: int, frame: Any) -> None:
        log.warning("passing %s on to the job's process %d", signal.Signals(signum).name, process.pid)
        process.send_signal(signum)

    return handling_signals(forward)
