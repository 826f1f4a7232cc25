"""What the benchmark scripts share: the figure line format, recipe configs, the cache folder, threads.

A figure is one stdout line ``name value unit`` (`figure`); `benchmarks/run_all.py` collects exactly
those lines. Anything else a script prints (set-up, breakdowns) is context for a human reader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Written once, reused by later runs (logs/ is gitignored); KWS_BENCH_CACHE moves it.
BENCH_CACHE = Path(os.environ.get("KWS_BENCH_CACHE", REPO / "logs" / "bench_cache"))
DEV_DATA = os.environ.get("KWS_DEV_DATA", str(REPO.parent / "shared" / "data" / "speech_commands_dev"))
KAGGLE_TEST_CLIPS = 158_538

FIGURE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# The recipe each registered network is trained with (conf/experiment/<recipe>.yaml, plus overrides):
# its batch size, front end and optimiser are what a training-cost figure must use.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "bc_resnet": ("bc_resnet", []),
    "cnn_trad_pool2": ("seed_baseline", []),
    "ds_cnn": ("ds_cnn", []),
    "embedding_linear": ("embedding_mlp", ["model=embedding_linear"]),
    "embedding_mlp": ("embedding_mlp", []),
    "embedding_tcn": ("embedding_tcn", []),
    "light_cnn": ("light_cnn_8k", []),
    "matchboxnet": ("matchboxnet", []),
    "res15": ("res15", []),
    "res8": ("res8", []),
    "res8_narrow": ("res8", ["model=res8_narrow"]),
    "tc_resnet14": ("tc_resnet", []),
    "tc_resnet8": ("tc_resnet", ["model=tc_resnet8"]),
    "best": ("best", []),
}


def figure(name: str, value: float, unit: str) -> None:
    """Print one figure line, ``name value unit``, the only lines run_all.py collects."""
    if not FIGURE_NAME.match(name) or not unit or " " in unit:
        raise ValueError(f"figure name {name!r} / unit {unit!r}: lower_snake_case name, one-word unit")
    digits = 4 if abs(value) < 1 else 2 if abs(value) < 100 else 0
    print(f"{name} {value:.{digits}f} {unit}", flush=True)


def set_threads(threads: int) -> int:
    """Pin torch's intra-op threads (0: leave torch's default) and one inter-op thread; returns the count."""
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work ran before): keep it
        pass
    return torch.get_num_threads()


def compose_recipe(model: str, extra: list[str] | None = None) -> DictConfig:
    """The training config of `model`'s recipe (RECIPES), or train.yaml's defaults with model=<model>
    when it has none. Nothing is resolved that needs a Hydra run (paths.output_dir stays unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    experiment, overrides = RECIPES.get(model, (None, [f"model={model}"]))
    overrides = ([f"experiment={experiment}"] if experiment else []) + overrides + list(extra or [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="train", overrides=overrides)


def recipe_model(model: str, num_classes: int = 12) -> tuple[torch.nn.Module, DictConfig]:
    """(KWSModel, config) of `model`'s recipe, untrained: speed needs no training."""
    from kws_lightning.utils.instantiate import build_kws_model

    cfg = compose_recipe(model)
    return build_kws_model(cfg.feature, cfg.model, num_classes), cfg


# Lightning's precision names -> the autocast dtype of the forward pass (None: plain float32).
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def training_step_fn(
    cfg: DictConfig, model: torch.nn.Module, precision: str = "32-true"
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One optimiser step of the recipe, as KWSLightningModule.training_step runs it: front end ->
    SpecAugment (if the recipe has it) -> network -> the recipe's loss -> backward -> optimiser step, on
    the model's device. `precision` as Lightning's: the forward under autocast, and for 16-mixed a
    gradient scaler (the front end itself always computes in float32)."""
    from hydra.utils import instantiate

    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r}: one of {sorted(AUTOCAST_DTYPES)}")
    model.train()
    device = next(model.parameters()).device
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    criterion = instantiate(cfg.loss) if cfg.get("loss") else torch.nn.CrossEntropyLoss()
    spec_augment = instantiate(cfg.spec_augment) if cfg.get("spec_augment") else None
    dtype = AUTOCAST_DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def step(waves: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = model.frontend(waves)
            if spec_augment is not None:
                features = spec_augment(features)
            loss = criterion(model.net(features), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    return step
