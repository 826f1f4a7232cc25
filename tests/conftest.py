"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """In-process tests run small tensors: one torch thread. On 2 shared cores, two OpenMP threads competing
    with other processes ran the model tests ~10x slower (measured 50 s vs 4 s). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small enough to generate in seconds, large enough that every split has each keyword.
SYNTHETIC_CLIPS_PER_WORD = 40
SYNTHETIC_NOISE_SECONDS = 10


@pytest.fixture(scope="session")
def synthetic_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`python -m kws_lightning.train` overrides for a small synthetic data set, generated once per session
    into a shared cache (the wave cache built by the first run is reused by the others too)."""
    from kws_lightning.data.synthetic import ensure_synthetic_dataset

    cache = Path(tmp_path_factory.mktemp("kws_cache"))
    ensure_synthetic_dataset(
        cache, clips_per_word=SYNTHETIC_CLIPS_PER_WORD, seed=0, noise_seconds=SYNTHETIC_NOISE_SECONDS
    )
    return [
        "data=synthetic",
        f"paths.cache_dir={cache}",
        f"data.synthetic.clips_per_word={SYNTHETIC_CLIPS_PER_WORD}",
        "data.synthetic.seed=0",
        f"++data.synthetic.noise_seconds={SYNTHETIC_NOISE_SECONDS}",
    ]


@pytest.fixture(scope="session")
def synthetic_root(synthetic_overrides: list[str]) -> Path:
    """The session's synthetic speech folder (training layout, speaker-disjoint validation / testing lists),
    for tests that use it as a plain data.root."""
    from kws_lightning.data.synthetic import ensure_synthetic_dataset

    cache = next(Path(o.split("=", 1)[1]) for o in synthetic_overrides if o.startswith("paths.cache_dir="))
    return Path(
        ensure_synthetic_dataset(
            cache, clips_per_word=SYNTHETIC_CLIPS_PER_WORD, seed=0, noise_seconds=SYNTHETIC_NOISE_SECONDS
        )
    )


# ---- eval / predict / listen / export tests (issue 5): one tiny trained checkpoint for all of them ----

# ~20 s of CPU: 5 epochs of ~400 synthetic items with a narrow cnn-trad-pool2 (test/acc 0.40 vs chance
# 0.08): a real checkpoint from a real run, not a good model.
TINY_TRAIN_OVERRIDES = [
    "experiment=quickstart",
    "model.n_feature_maps=16",
    "data.batch_size=32",
    "optimizer.lr=0.003",
    "scheduler.warmup_steps=5",
    "trainer.max_epochs=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
]


@pytest.fixture(scope="session")
def run_cli() -> object:
    """Run ``python -m kws_lightning.<entry> overrides...`` in `cwd`; returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    def run(
        entry: str, *overrides: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """`env`: variables set on top of this process's environment."""
        return subprocess.run(
            [sys.executable, "-m", f"kws_lightning.{entry}", f"paths.log_dir={cwd / 'logs'}", *overrides],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(
    synthetic_overrides: list[str], run_cli: object, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Train once per session. Keys: ckpt (best checkpoint), run_dir, test_acc (as train printed it),
    cache_dir, data_root (the synthetic folder: training layout with split lists), overrides."""
    import re

    from kws_lightning.data.synthetic import ensure_synthetic_dataset

    work = Path(tmp_path_factory.mktemp("tiny_ckpt"))
    run_dir = work / "run"
    overrides = [*synthetic_overrides, *TINY_TRAIN_OVERRIDES, f"hydra.run.dir={run_dir}"]
    result = run_cli("train", *overrides, cwd=work)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    best = re.search(r"^best checkpoint: (.+)$", result.stdout, re.M).group(1).strip()
    test_acc = float(re.search(r"test/acc ([0-9.]+)", result.stdout).group(1))
    key = "paths.cache_dir="
    cache_dir = next(Path(o[len(key) :]) for o in synthetic_overrides if o.startswith(key))
    data_root = ensure_synthetic_dataset(
        cache_dir, clips_per_word=SYNTHETIC_CLIPS_PER_WORD, seed=0, noise_seconds=SYNTHETIC_NOISE_SECONDS
    )
    return {
        "ckpt": Path(best),
        "run_dir": run_dir,
        "test_acc": test_acc,
        "cache_dir": cache_dir,
        "data_root": Path(data_root),
        "overrides": synthetic_overrides,
    }
