"""`cv`'s folds on disk: which command trains fold i, and what state a fold folder is in (done, to resume,
to start, being trained by another process), read from its `job_result.json` and checkpoints.

A fold is `<out_dir>/fold_<i>/`, trained by `python -m kws_lightning.train <overrides> data.fold=i
data.num_folds=k hydra.run.dir=<out_dir>/fold_<i>` (plus `ckpt_path=auto` when it resumes), its output in
`<out_dir>/fold_<i>.log`: the same layout whether `cv` or a person started it, so either picks up the other.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kws_lightning.utils.job_result import FAILED, FILENAME, INTERRUPTED, OK, JobResult, read_job_result

# cv's own settings (conf/cv.yaml); every other override on cv's command line is passed on to each fold.
CV_KEYS = (
    "k",
    "jobs",
    "threads",
    "out_dir",
    "aggregate_only",
    "folds",
    "score_batch_size",
    "score_device",
    "ensemble",
    "ensemble_weights",
    "tta",
    "tta_options",
    "compare",
    "compare_weights",
)
# Keys cv sets for every fold itself: given by the user they would be overwritten, so they are an error.
OWNED_KEYS = {
    "data.fold": "cv trains every fold 0..k-1 itself",
    "data.num_folds": "k=K sets it",
    "ckpt_path": "each fold resumes from its own last.ckpt (ckpt_path=auto) when cv is run again",
    "hparams_search": "cv trains one configuration per fold, not a search",
}
# Overrides that do not change what a fold learns (resuming, display, logging): a fold trained with or
# without them is the same fold. A key equal to one of these or under it (`logger.csv.x`) is ignored.
COSMETIC_KEYS = (
    "ckpt_path",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "logger",
    "callbacks.tensorboard_extras",
    "callbacks.console_table",
    "callbacks.lr_monitor",
)

# Fold states.
DONE, RESUME, START, RETRY, BUSY = "done", "resume", "start", "retry", "busy"


class CVError(ValueError):
    """A cv command that cannot run as given; the message names what is wrong and the fix."""


def override_key(override: str) -> str:
    """`+a.b=1`, `++a.b=1`, `~a.b`, `a.b=1` -> `a.b`."""
    return override.lstrip("~+").split("=", 1)[0].strip()


def split_overrides(task_overrides: list[str]) -> list[str]:
    """The training overrides on cv's command line, in their order (cv's own keys removed). A key cv owns
    is an error naming why."""
    train = []
    for override in task_overrides:
        key = override_key(override)
        if key in CV_KEYS:
            continue
        if key in OWNED_KEYS:
            raise CVError(f"{override}: cv sets {key} for each fold ({OWNED_KEYS[key]}); drop it")
        train.append(override)
    return train


def fold_dir(out_dir: Path, fold: int) -> Path:
    return out_dir / f"fold_{fold}"


def fold_log(out_dir: Path, fold: int) -> Path:
    return out_dir / f"fold_{fold}.log"


def fold_command(train_overrides: list[str], fold: int, k: int, folder: Path, resume: bool) -> list[str]:
    """The training command of one fold (the layout a fold started by hand uses too)."""
    command = [
        sys.executable,
        "-m",
        "kws_lightning.train",
        *train_overrides,
        f"data.fold={fold}",
        f"data.num_folds={k}",
        f"hydra.run.dir={folder}",
    ]
    return [*command, "ckpt_path=auto"] if resume else command


@dataclass
class FoldState:
    """What cv does with a fold: `done` (job_result.json ok: not retrained), `resume` (interrupted or killed:
    ckpt_path=auto), `start` (nothing there), `retry` (failed before: run again, resuming when it can) or
    `busy` (another process trains it now: left alone)."""

    fold: int
    folder: Path
    state: str
    detail: str
    result: JobResult | None = None


def fold_state(out_dir: Path, fold: int) -> FoldState:
    folder = fold_dir(out_dir, fold)
    result_path = folder / FILENAME
    result = None
    if result_path.is_file():
        try:
            result = read_job_result(result_path)
        except ValueError as error:
            return FoldState(fold, folder, RETRY, f"unreadable {FILENAME} ({error})")
        if result.status == OK:
            return FoldState(fold, folder, DONE, f"{FILENAME} ok", result)
    pid = training_process(folder)
    if pid is not None:
        return FoldState(fold, folder, BUSY, f"being trained now by process {pid} (not this cv)", result)
    where = "its last.ckpt" if last_checkpoint(folder).is_file() else "nothing saved"
    if result is not None and result.status == FAILED:
        error = result.error or "no error recorded"
        error = error if len(error) <= 160 else error[:157] + "..."
        return FoldState(fold, folder, RETRY, f"failed before ({error}; {where})", result)
    if result is not None and result.status == INTERRUPTED:
        return FoldState(fold, folder, RESUME, f"interrupted ({where})", result)
    if where == "its last.ckpt":
        return FoldState(fold, folder, RESUME, f"stopped without a {FILENAME} (killed?; {where})", result)
    return FoldState(fold, folder, START, "not started", result)


def last_checkpoint(folder: Path) -> Path:
    """Where a fold's `ckpt_path=auto` resumes from (`kws_lightning.utils.resume.own_last_checkpoint`; not
    imported here: it loads torch, seconds cv does not need before it trains anything)."""
    return folder / "checkpoints" / "last.ckpt"


def training_process(folder: Path) -> int | None:
    """The id of a running `kws_lightning.train` whose run dir is `folder` (a fold started by hand or by
    another cv), or None. Reads /proc: on systems without it, None (nothing is detected)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target = folder.resolve()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if b"kws_lightning.train" not in args:
                continue
            for arg in args:
                if arg.startswith(b"hydra.run.dir="):
                    value = Path(os.fsdecode(arg[len(b"hydra.run.dir=") :]))
                    if not value.is_absolute():
                        value = Path(os.readlink(entry / "cwd")) / value
                    if value.resolve() == target:
                        return int(entry.name)
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
    return None


def recorded_overrides(folder: Path) -> list[str] | None:
    """The overrides a fold was trained with (`.hydra/overrides.yaml`), None when it has none yet."""
    from omegaconf import OmegaConf

    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        return [str(item) for item in OmegaConf.to_container(OmegaConf.load(path))]
    except Exception as error:  # a damaged file: say which
        raise CVError(f"{path} is unreadable ({error}): delete {folder} to retrain that fold") from error


def _comparable(overrides: list[str], cwd: Path) -> dict[str, str]:
    values = {}
    for override in overrides:
        key = override_key(override)
        if any(key == c or key.startswith(f"{c}.") for c in COSMETIC_KEYS):
            continue
        value = override.split("=", 1)[1] if "=" in override else ""
        if key in ("data.root", "paths.cache_dir", "paths.log_dir") and value not in ("", "null"):
            value = str((cwd / Path(value).expanduser()).resolve())
        values[key] = value
    return values


def check_same_training(folder: Path, expected: list[str], cwd: Path | None = None) -> None:
    """A fold folder trained with other overrides than this cv run's is an error naming the difference: its
    figures (or a resume of it) would mix two configurations."""
    recorded = recorded_overrides(folder)
    if recorded is None:
        return
    cwd = cwd or Path.cwd()
    have, want = _comparable(recorded, cwd), _comparable(expected, cwd)
    if have == want:
        return
    keys = sorted(set(have) | set(want))
    diff = "; ".join(
        f"{key}: {have.get(key, '(not set)')} there, {want.get(key, '(not set)')} now"
        for key in keys
        if have.get(key) != want.get(key)
    )
    raise CVError(
        f"{folder} was trained with other overrides than this cv run ({diff}). Run cv with the same "
        "training overrides, or give another out_dir=DIR (or delete that fold folder to retrain it)"
    )


def last_error_line(log_path: Path, limit: int = 300) -> str:
    """The last line of a fold's log that names an error (else its last line): what a report can show."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 65536))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError as error:
        return f"(no log: {error})"
    lines = [line.strip() for line in lines if line.strip()]
    markers = ("Error", "error:", "Exception")
    found = next((line for line in reversed(lines) if any(m in line for m in markers)), None)
    text = found or (lines[-1] if lines else "(empty log)")
    return text if len(text) <= limit else text[: limit - 3] + "..."
