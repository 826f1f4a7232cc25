"""Feature normalisation (issue 11): `none` is today's front end bit for bit, `per_utterance` gives each
clip's bins mean 0 / std 1, `dataset` estimates its statistics once at fit start, keeps them in the
checkpoint, and never re-estimates them when a checkpoint is loaded or a run resumed."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from audio_trees import make_training_tree
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from training_helpers import compose_train, make_trainer

from kws_lightning import feature_stats
from kws_lightning.callbacks import EMA
from kws_lightning.data.datamodule import SpeechCommandsDataModule
from kws_lightning.export import export_onnx, export_torchscript, load_exported
from kws_lightning.feature_norm import FeatureNorm
from kws_lightning.features import MFCC, LogMel, LogSpectrogram
from kws_lightning.inference import load_checkpoint_model
from kws_lightning.module import KWSLightningModule
from kws_lightning.utils.instantiate import build_kws_model, to_plain

FRONT_ENDS = {"mfcc": MFCC, "logmel": LogMel, "logspec": LogSpectrogram}
CONF_FEATURE = Path(__file__).resolve().parents[1] / "conf" / "feature"


def speechlike(batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Tones with an envelope in noise, one with a stretch of digital silence at the start."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000.0
    waves = [
        0.3 * np.exp(-(((t - 0.5) / 0.15) ** 2)) * np.sin(2 * np.pi * (300 + 200 * k) * t)
        + 0.01 * rng.standard_normal(t.size)
        for k in range(batch)
    ]
    waves[0][:4000] = 0.0
    return torch.tensor(np.stack(waves), dtype=torch.float32)


# ---- none / per_utterance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_none_is_the_unnormalised_front_end_exactly(name: str) -> None:
    cls = FRONT_ENDS[name]
    x = speechlike()
    assert torch.equal(cls(normalize="none")(x), cls()(x))  # the class default: seed-exact, librosa-tested
    cfg = OmegaConf.load(CONF_FEATURE / f"{name}.yaml")
    cfg.normalize = "none"
    assert torch.equal(instantiate(cfg)(x), cls()(x))
    # No stored state: checkpoints written before normalisation existed load unchanged.
    assert cls(normalize="none").state_dict() == {}
    assert cls(normalize="per_utterance").state_dict() == {}


@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_per_utterance_gives_each_clip_zero_mean_unit_std_per_bin(name: str) -> None:
    x = speechlike()
    raw = FRONT_ENDS[name]()(x)
    out = FRONT_ENDS[name](normalize="per_utterance")(x)
    assert out.shape == raw.shape and torch.isfinite(out).all()
    mean, std = out.mean(dim=2), out.std(dim=2, unbiased=False)
    assert mean.abs().max() < 1e-4
    varying = raw.std(dim=2, unbiased=False) > 1e-2  # bins that are not constant in the clip
    assert varying.float().mean() > 0.9
    torch.testing.assert_close(std[varying], torch.ones_like(std[varying]), atol=1e-3, rtol=0)
    # A clip of digital silence has constant bins: they become 0 (to rounding), not NaN or noise.
    silent = FRONT_ENDS[name](normalize="per_utterance")(torch.zeros(1, 16000))
    assert silent.abs().max() < 1e-5


def test_feature_configs_default_to_per_utterance_and_refuse_unknown_modes() -> None:
    for name in FRONT_ENDS:
        assert OmegaConf.load(CONF_FEATURE / f"{name}.yaml").normalize == "per_utterance"
    with pytest.raises(ValueError, match="per_utterance"):
        MFCC(normalize="global")


def test_dataset_norm_is_the_identity_until_estimated_then_standardises() -> None:
    norm = FeatureNorm("dataset", 3)
    x = torch.randn(2, 1, 5, 3) * 7 + 2
    assert norm.needs_statistics and torch.equal(norm(x), x)
    norm.set_statistics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 0.0]))
    assert not norm.needs_statistics
    expected = (x - torch.tensor([1.0, 2.0, 3.0])) / torch.tensor([2.0, 4.0, norm.eps])
    torch.testing.assert_close(norm(x), expected)
    assert set(norm.state_dict()) == {"mean", "std", "fitted"}


@pytest.mark.parametrize(
    ("name", "mode"), [("mfcc", "dataset"), ("logmel", "per_utterance"), ("logspec", "per_utterance")]
)
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_carry_the_normalisation(name: str, mode: str, fmt: str, tmp_path: Path) -> None:
    frontend = FRONT_ENDS[name](normalize=mode).eval()
    if mode == "dataset":
        bins = frontend.norm.mean.numel()
        frontend.norm.set_statistics(torch.linspace(-20, 5, bins), torch.linspace(1, 30, bins))
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    path = exporter(frontend, tmp_path / f"frontend.{fmt}", 16000, {})
    waves = torch.cat([speechlike(3), torch.zeros(1, 16000)])  # digital silence too
    got = load_exported(path, fmt)(waves.numpy())
    with torch.no_grad():
        expected = frontend(waves).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 2e-3  # float32 log features, the matmul DFTs in ONNX


# ---- dataset: estimated at fit start, stored, restored -------------------------------------------------


def _datamodule(root: Path, cache: Path) -> SpeechCommandsDataModule:
    return SpeechCommandsDataModule(
        root=str(root), keywords=["yes", "no"], batch_size=16, cache_dir=str(cache), seed=3
    )


def _module() -> KWSLightningModule:
    cfg = compose_train("feature=mfcc", "feature.normalize=dataset", "model.n_feature_maps=4")
    model = build_kws_model(cfg.feature, cfg.model, num_classes=4)
    return KWSLightningModule(
        model=model,
        labels=["silence", "unknown", "yes", "no"],
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        config={"feature": to_plain(cfg.feature), "model": to_plain(cfg.model)},
    )


def _fit(module, dm, tmp_path: Path, max_steps: int, ckpt_path: str | None = None) -> pl.Trainer:
    trainer = make_trainer(
        tmp_path,
        max_steps=max_steps,
        enable_checkpointing=True,
        limit_val_batches=1,
        val_check_interval=2,
        # EMA copies the weights when fitting starts: the statistics must be there by then.
        callbacks=[EMA(decay=0.9), ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dataset_norm")
    root = make_training_tree(tmp / "sc", {"yes": 20, "no": 20, "bed": 10}, speakers=10)
    dm = _datamodule(root, tmp / "cache")
    module = _module()
    assert module.model.frontend.norm.needs_statistics
    _fit(module, dm, tmp / "run", max_steps=4)
    return {"root": root, "tmp": tmp, "dm": dm, "module": module, "ckpt": tmp / "run" / "ck" / "last.ckpt"}


def test_dataset_statistics_are_estimated_at_fit_start_from_training_clips(dataset_run: dict) -> None:
    norm = dataset_run["module"].model.frontend.norm
    assert not norm.needs_statistics
    # Recomputed here by hand: the same unaugmented training clips through the unnormalised MFCC.
    waves = torch.cat(
        list(feature_stats.statistics_waves(dataset_run["dm"], feature_stats.DEFAULT_NUM_CLIPS))
    )
    assert len(waves) == len(dataset_run["dm"].train_sampler.epoch_items(0))  # fewer than 3,000: all of them
    feats = MFCC()(waves).double().reshape(-1, 40)
    torch.testing.assert_close(norm.mean.double(), feats.mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(norm.std.double(), feats.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    assert norm.std[0] > 10  # MFCC c0 (log energy): the raw scale normalising is for


def test_dataset_statistics_are_in_the_checkpoint_and_loaded_not_recomputed(
    dataset_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    norm = dataset_run["module"].model.frontend.norm
    state = torch.load(dataset_run["ckpt"], weights_only=True)["state_dict"]
    # EMA-averaged checkpoint weights: constant buffers average to themselves, bit for bit.
    assert torch.equal(state["model.frontend.norm.mean"], norm.mean)
    assert torch.equal(state["model.frontend.norm.std"], norm.std)
    assert bool(state["model.frontend.norm.fitted"])

    def refuse(*args, **kwargs):
        raise AssertionError("feature statistics re-estimated")

    monkeypatch.setattr(feature_stats, "estimate_statistics", refuse)
    model, _ = load_checkpoint_model(dataset_run["ckpt"])
    loaded = model.frontend.norm
    assert loaded.mode == "dataset" and not loaded.needs_statistics
    assert torch.equal(loaded.mean, norm.mean) and torch.equal(loaded.std, norm.std)
    module = KWSLightningModule.from_checkpoint(dataset_run["ckpt"])
    assert torch.equal(module.model.frontend.norm.mean, norm.mean)


def test_a_resumed_fit_keeps_the_checkpoint_statistics(
    dataset_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = torch.load(dataset_run["ckpt"], weights_only=True)["state_dict"]

    def refuse(*args, **kwargs):
        raise AssertionError("feature statistics re-estimated on resume")

    monkeypatch.setattr(feature_stats, "estimate_statistics", refuse)
    module = _module()  # fresh: identity statistics until the checkpoint is loaded
    tmp = dataset_run["tmp"]
    _fit(
        module, _datamodule(dataset_run["root"], tmp / "cache"), tmp / "resumed", 6, str(dataset_run["ckpt"])
    )
    norm = module.model.frontend.norm
    assert torch.equal(norm.mean, saved["model.frontend.norm.mean"])
    assert torch.equal(norm.std, saved["model.frontend.norm.std"])
