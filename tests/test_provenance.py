"""What produced a run (kws_lightning/utils/provenance.py): run_info.json and config_resolved.yaml in the run
dir, the same record in every checkpoint (readable with weights_only=True), eval printing it; the data index
hash, and git state outside a repository or without git."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from audio_trees import make_training_tree

from kws_lightning.utils.provenance import (
    CHECKPOINT_KEY,
    CONFIG_RESOLVED,
    RUN_INFO,
    describe,
    git_state,
    read_checkpoint_provenance,
)

HEX40, HEX64 = re.compile(r"^[0-9a-f]{40}$"), re.compile(r"^[0-9a-f]{64}$")


def checkout_commit() -> str | None:
    """HEAD of the checkout the package runs from, asked of git directly (None without one)."""
    import subprocess

    from kws_lightning.utils.provenance import package_dir

    done = subprocess.run(
        ["git", "-C", str(package_dir()), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else None


def test_run_dir_records_what_produced_it(tiny_checkpoint: dict) -> None:
    run_dir = Path(tiny_checkpoint["run_dir"])
    info = json.loads((run_dir / RUN_INFO).read_text())
    assert info["versions"]["kws-lightning"] == "0.1.0"
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["pytorch-lightning"] and info["versions"]["python"]
    git, head = info["git"], checkout_commit()
    if head:  # the tests run from a clone: its commit, and whether the tree differs from it
        assert git["commit"] == head and HEX40.match(head) and isinstance(git["dirty"], bool), git
    else:  # a copy without commits (an unpacked archive, `git init` alone): no commit, and why
        assert git["commit"] is None and git["error"], git
    assert HEX64.match(info["data"]["index_hash"])
    assert info["data"]["clips"] > 0
    assert Path(info["data"]["root"]) == Path(tiny_checkpoint["data_root"]).resolve()
    assert info["command"].startswith("python -m kws_lightning.train ")
    assert "data.batch_size=32" in info["overrides"] and info["run_dir"] == str(run_dir)

    # Resolved: no ${...} left (.hydra/config.yaml keeps them), and the values the run used.
    text = (run_dir / CONFIG_RESOLVED).read_text()
    assert "${" not in text and "${" in (run_dir / ".hydra" / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["paths"]["output_dir"] == str(run_dir)
    assert config["data"]["batch_size"] == 32 and config["data"]["seed"] == config["seed"]


def test_checkpoint_carries_the_record_as_plain_data(tiny_checkpoint: dict) -> None:
    run_dir = Path(tiny_checkpoint["run_dir"])
    info = json.loads((run_dir / RUN_INFO).read_text())
    for ckpt in (tiny_checkpoint["ckpt"], run_dir / "checkpoints" / "last.ckpt"):
        record = torch.load(ckpt, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
        # Plain containers only: JSON round-trips it unchanged.
        assert json.loads(json.dumps(record)) == record
        assert record["git"] == info["git"] and record["versions"] == info["versions"]
        assert record["data"]["index_hash"] == info["data"]["index_hash"]
        assert record["config"] == yaml.safe_load((run_dir / CONFIG_RESOLVED).read_text())
    assert read_checkpoint_provenance(tiny_checkpoint["ckpt"])["data"] == info["data"]


def test_eval_prints_the_checkpoints_provenance(
    tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    info = json.loads((Path(tiny_checkpoint["run_dir"]) / RUN_INFO).read_text())
    result = run_cli(
        "eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"paths.cache_dir={tiny_checkpoint['cache_dir']}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"checkpoint: {tiny_checkpoint['ckpt']}" in out
    commit = info["git"]["commit"]
    assert f"trained by kws-lightning 0.1.0 (git {commit[:12] if commit else 'unknown: '}" in out
    assert f"torch {torch.__version__}" in out
    assert f"data index {info['data']['index_hash'][:16]} ({info['data']['clips']} clips" in out
    assert "command: python -m kws_lightning.train " in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    recorded = metrics["provenance"][str(tiny_checkpoint["ckpt"])]
    assert recorded["data"] == info["data"] and "config" not in recorded


def _indexed(root: Path):
    from kws_lightning.data.datamodule import SpeechCommandsDataModule
    from kws_lightning.data.index import index_training_layout

    datamodule = SpeechCommandsDataModule(root=str(root), keywords=["yes", "no"], cache_dir=None)
    datamodule.dataset = index_training_layout(root, ["yes", "no"])  # the clip table is all the hash needs
    return datamodule.index_hash()


def test_index_hash_follows_the_clip_table_not_its_location(tmp_path: Path) -> None:
    root = make_training_tree(tmp_path / "a", {"yes": 10, "no": 10, "cat": 10}, noise_seconds=0)
    digest = _indexed(root)
    assert HEX64.match(digest)
    assert _indexed(shutil.copytree(root, tmp_path / "b")) == digest  # same table elsewhere
    moved = next((tmp_path / "b" / "cat").glob("*.wav"))
    moved.rename(tmp_path / "b" / "yes" / ("moved_" + moved.name))  # one clip relabelled
    assert _indexed(tmp_path / "b") != digest
    (root / "testing_list.txt").write_text(f"no/{next((root / 'no').glob('*.wav')).name}\n")
    (root / "validation_list.txt").write_text("")
    assert _indexed(root) != digest  # a split changed


def test_git_state_outside_a_repository_and_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "__init__.py").write_text("")
    outside = git_state(tmp_path)
    assert outside["commit"] is None and outside["error"].startswith("not a git checkout")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on the PATH
    assert git_state(tmp_path) == {"commit": None, "error": "git is not installed"}


def test_describe_without_a_record() -> None:
    assert "none recorded" in describe(None)
    assert "git unknown: git is not installed" in describe(
        {"git": {"commit": None, "error": "git is not installed"}}
    )
