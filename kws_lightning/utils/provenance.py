"""What produced a run: package and library versions, git commit, command, data index hash, resolved config.

`kws_lightning.train` writes `config_resolved.yaml` (every `${...}` resolved, unlike `.hydra/config.yaml`)
and `run_info.json` into the run dir, and puts the same record, config included, into every checkpoint as
``checkpoint["provenance"]`` (plain str / int / float / bool / None / list / dict only, so a
``torch.load(weights_only=True)`` reads it); `python -m kws_lightning.eval` prints it. Nothing here imports
torch or Lightning: versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

RUN_INFO = "run_info.json"
CONFIG_RESOLVED = "config_resolved.yaml"
CHECKPOINT_KEY = "provenance"
# Distributions whose versions decide what a run computes.
DISTRIBUTIONS = (
    "kws-lightning",
    "torch",
    "pytorch-lightning",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "numpy",
    "librosa",
    "soundfile",
    "scipy",
)
_GIT_TIMEOUT_S = 10
_MAX_DIRTY_FILES = 20


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def versions() -> dict[str, str | None]:
    """Python and the installed version of each distribution in `DISTRIBUTIONS` (None when absent)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git(folder: Path, *args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock while someone commits in the same tree.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(
        ["git", "-C", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=_GIT_TIMEOUT_S,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"git {args[0]} exited with {done.returncode}")
    return done.stdout


def git_state(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit of the git work tree the code runs from and whether it has uncommitted changes.

    ``{"commit": None, "error": why}`` when there is no git, the code is not in a repository (an installed
    wheel), or the package's files are not tracked there (a copy inside someone else's repository).
    """
    folder = Path(folder) if folder is not None else package_dir()
    try:
        # Tracked here? An installed copy under a repository's .venv is not this repository's code.
        _git(folder, "ls-files", "--error-unmatch", "--", "__init__.py")
        commit = _git(folder, "rev-parse", "HEAD").strip()
        changes = _git(folder, "status", "--porcelain").splitlines()
        root = _git(folder, "rev-parse", "--show-toplevel").strip()
    except FileNotFoundError:
        return {"commit": None, "error": "git is not installed"}
    except subprocess.TimeoutExpired:
        return {"commit": None, "error": f"git did not answer within {_GIT_TIMEOUT_S} s"}
    except (RuntimeError, OSError) as error:
        return {"commit": None, "error": f"not a git checkout ({error})"}
    return {
        "commit": commit,
        "dirty": bool(changes),
        "dirty_files": [line[3:] for line in changes[:_MAX_DIRTY_FILES]],
        "dirty_count": len(changes),
        "root": root,
    }


def command_line() -> str:
    """The command as typed: ``python -m kws_lightning.train a=b`` rather than the module's file path."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join([*program, *sys.argv[1:]])


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config with every interpolation resolved, as plain containers."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


def collect_run_info(cfg: DictConfig, run_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Everything known before the data is indexed; `data` is filled in when training starts."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
    except ImportError:
        pass
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "overrides": overrides,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "resumed_from": cfg.get("ckpt_path"),
        "seed": cfg.get("seed"),
        "versions": versions(),
        "git": git_state(),
        "platform": platform.platform(),
        "data": None,
        "config_file": CONFIG_RESOLVED,
    }


def _write_atomically(path: Path, text: str) -> None:
    # Every DDP process may write the same file: write beside it, then rename, so no reader sees half.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_resolved_config(run_dir: str | os.PathLike, cfg: DictConfig) -> Path:
    path = Path(run_dir) / CONFIG_RESOLVED
    _write_atomically(path, OmegaConf.to_yaml(resolved_config(cfg)))
    return path


def write_run_info(run_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    path = Path(run_dir) / RUN_INFO
    _write_atomically(path, json.dumps(info, indent=2) + "\n")
    return path


def read_checkpoint_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's provenance record (None when it has none). Opened by the one safe loader
    (`kws_lightning.checkpoints.load_checkpoint`, plain data only) with mmap: the weights are not read."""
    from kws_lightning.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path, mmap=True)
    record = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return record if isinstance(record, dict) else None


def describe(record: dict[str, Any] | None) -> str:
    """A few lines for a terminal: code, libraries, data, command."""
    if not record:
        return "  provenance: none recorded (trained before run_info existed, or not by kws_lightning.train)"
    found = record.get("versions") or {}
    git = record.get("git") or {}
    if git.get("commit"):
        dirty = f", uncommitted changes in {git.get('dirty_count', 0)} file(s)" if git.get("dirty") else ""
        code = f"git {git['commit'][:12]}{dirty}"
    else:
        code = f"git unknown: {git.get('error', 'not recorded')}"
    libraries = ", ".join(
        f"{name} {found[name]}" for name in ("python", "torch", "pytorch-lightning") if found.get(name)
    )
    data = record.get("data") or {}
    data_line = "data index: not recorded"
    if data:
        digest = str(data.get("index_hash", "?"))[:16]
        data_line = f"data index {digest} ({data.get('clips', '?')} clips under {data.get('root')})"
    return "\n".join(
        [
            f"  trained by kws-lightning {found.get('kws-lightning')} ({code}), {record.get('created_utc')}",
            f"  {libraries}",
            f"  {data_line}",
            f"  command: {record.get('command')}",
            f"  trained in: {record.get('run_dir')}",
        ]
    )
