"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

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
