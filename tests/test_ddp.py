"""Two-process DDP on the CPU (gloo), as a user runs it: `python -m kws_lightning.train trainer=ddp_cpu`.

One real 2-process run (Lightning's own launcher re-runs the command for rank 1) on a small synthetic set,
checked for: disjoint training shards that together make the epoch's draw, validation accuracy equal to a
single-process evaluation of the same checkpoint, and one wave cache file built once and memory-mapped by
both processes. Then a sweep over trainer.devices=1,2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from training_helpers import check_ok

TESTS_DIR = Path(__file__).resolve().parent
# Tiny and quiet: 4 training steps per process, then one full validation.
TINY = [
    "model.n_feature_maps=8",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "test=false",
]


def run_train(
    cwd: Path, *overrides: str, multirun: bool = False, timeout: float = 240
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kws_lightning.train",
            *(["-m"] if multirun else []),
            f"paths.log_dir={cwd / 'logs'}",
            *overrides,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> dict:
    """One 2-process run with a fresh (empty) cache folder, so the wave cache is built during the run."""
    cwd = tmp_path_factory.mktemp("ddp")
    run_dir, probe_dir, cache_dir = cwd / "run", cwd / "probe", cwd / "fresh_cache"
    run = run_train(
        cwd,
        "data=speech_commands",
        f"data.root={synthetic_root}",
        f"paths.cache_dir={cache_dir}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        *TINY,
        "+callbacks.probe._target_=ddp_probe.ShardProbe",
        f"+callbacks.probe.out_dir={probe_dir}",
        f"hydra.run.dir={run_dir}",
    )
    output = check_ok(run) + run.stderr  # stderr: the logging (cache built / loaded)
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    result = json.loads((run_dir / "job_result.json").read_text())
    return {"run_dir": run_dir, "cache_dir": cache_dir, "ranks": ranks, "result": result, "output": output}


@pytest.mark.slow
def test_training_shards_are_disjoint_and_cover_the_epoch(ddp_run: dict) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert (rank0["rank"], rank1["rank"]) == (0, 1) and rank0["world_size"] == rank1["world_size"] == 2
    # Lightning did not wrap our sampler (use_distributed_sampler: false), so set_epoch reaches it.
    assert rank0["sampler"] == rank1["sampler"] == "TFStyleSampler"
    draw = rank0["epoch_draw"]
    assert rank1["epoch_draw"] == draw  # both processes drew the same epoch
    shard0, shard1 = rank0["shard"], rank1["shard"]
    assert len(shard0) == len(shard1) == -(-len(draw) // 2)
    # Interleaved, the two shards are the epoch's draw in order (plus at most one wrap-around item).
    interleaved = [item for pair in zip(shard0, shard1, strict=True) for item in pair]
    assert interleaved[: len(draw)] == draw
    assert len(interleaved) - len(draw) <= 1
    # Without the pad (an odd draw wraps around to its first item, at the end of rank 1's shard), the shards
    # hold each drawn item once: no clip is trained on by both ranks (silence items are negative ids).
    unpadded1 = shard1[: len(draw) - len(shard0)]
    assert Counter(shard0) + Counter(unpadded1) == Counter(draw)
    assert not {i for i in shard0 if i >= 0} & {i for i in unpadded1 if i >= 0}


@pytest.mark.slow
def test_validation_shards_partition_the_fixed_draw(ddp_run: dict) -> None:
    rank0, rank1 = ddp_run["ranks"]
    draw = rank0["val_draw"]
    assert rank1["val_draw"] == draw
    # Disjoint and unpadded: summed metric states equal one process's over the whole draw.
    assert rank0["val_items"] == draw[0::2] and rank1["val_items"] == draw[1::2]


@pytest.mark.slow
def test_logged_val_accuracy_equals_single_process_evaluation(ddp_run: dict) -> None:
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kws_lightning.module import KWSLightningModule

    run_dir, result = ddp_run["run_dir"], ddp_run["result"]
    assert result["status"] == "ok" and result["world_size"] == 2
    logged = result["metrics"]["val/acc"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    datamodule = instantiate(cfg.data, _convert_="all")
    # last.ckpt was saved right after the one validation, with the weights it validated.
    module = KWSLightningModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (single,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    assert single["val/acc"] == pytest.approx(logged, abs=1e-6)
    assert single["val/loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-5)
    assert 0.0 < logged < 1.0


@pytest.mark.slow
def test_wave_cache_is_built_once_and_mapped_by_both_processes(ddp_run: dict) -> None:
    output = ddp_run["output"]
    # Rank 0 builds it in prepare_data; rank 1's setup (after Lightning's barrier) finds it.
    assert output.count("wave cache written") == 1, output[-4000:]
    assert "wave cache hit" in output
    (samples,) = Path(ddp_run["cache_dir"]).glob("waves-*/samples.npy")
    for rank in ddp_run["ranks"]:
        # A read-only memory map of the one file: the page cache holds one copy for both processes.
        assert rank["cache_is_memmap"] and rank["cache_file"] == str(samples.resolve())
        assert str(samples.resolve()) in rank["mapped_files"]


@pytest.mark.slow
def test_sweep_over_device_counts(tmp_path: Path, synthetic_overrides: list[str]) -> None:
    """`-m trainer.devices=1,2`: each job runs as a single run in its own process (Lightning's launcher
    re-runs the command line, which for a sweep would be the whole sweep)."""
    sweep_dir = tmp_path / "sweep"
    run = run_train(
        tmp_path,
        *synthetic_overrides,
        "trainer=ddp_cpu",
        "trainer.devices=1,2",
        *TINY,
        "trainer.limit_val_batches=2",
        f"hydra.sweep.dir={sweep_dir}",
        multirun=True,
        timeout=300,
    )
    output = check_ok(run) + run.stderr  # stderr: the logging (cache built / loaded)
    results = [json.loads((sweep_dir / str(job) / "job_result.json").read_text()) for job in (0, 1)]
    assert [r["status"] for r in results] == ["ok", "ok"], results
    assert [r["world_size"] for r in results] == [1, 2]
    assert [r["job_num"] for r in results] == [0, 1]
    assert [r["best_step"] for r in results] == [4, 4]
    # Each job's TensorBoard run is named after what the sweep varies.
    for job, devices in ((0, 1), (1, 2)):
        assert list((sweep_dir / str(job) / "tensorboard" / f"trainer.devices={devices}").glob("events.*"))
    assert "2 jobs (2 ok, 0 failed)" in (sweep_dir / "sweep_summary.md").read_text()
    assert "sweep summary:" in output
