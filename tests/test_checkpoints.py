"""Opening a checkpoint never runs code (issue 10, point 2): hostile checkpoints made from a real tiny
training run, opened through every CLI (eval, predict, export, listen, train resume) and the Python API.

Two kinds of payload: a pickled ``__reduce__`` object (it would create a marker file when unpickled) and a
stored config whose ``_target_`` names something outside kws-lightning's registries (``numpy.savetxt``
would write the marker; ``os.system`` / ``builtins.exec`` at other depths). Each must leave no marker,
exit non-zero, and say in one line (no traceback) which file is refused and why. The CLIs run with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, the switch users set to open old checkpoints: an explicit
``weights_only=True`` must still win.

Also (issue 29): a checkpoint of another model is named before a resume starts, and a stored data config
never chooses where files are written or deleted.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TINY_TRAIN_OVERRIDES
from omegaconf import OmegaConf

from kws_lightning.checkpoints import CheckpointError, build_stored, check_resume_checkpoint, load_checkpoint
from kws_lightning.eval import datamodule_test_set
from kws_lightning.inference import Predictor, load_checkpoint_model
from kws_lightning.module import KWSLightningModule

MARKER = "pwned.txt"


class RunsCode:
    """Unpickled, it runs `exec(source)`: the classic payload a hostile checkpoint carries."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return exec, (self.source,)


def touch_source(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def plain_checkpoint(tiny_checkpoint: dict) -> dict:
    return torch.load(tiny_checkpoint["ckpt"], map_location="cpu", weights_only=True)


def pickle_payload(tiny_checkpoint: dict, out: Path, marker: Path) -> Path:
    """The real checkpoint with a `__reduce__` payload nested in its stored model config."""
    checkpoint = plain_checkpoint(tiny_checkpoint)
    checkpoint["hyper_parameters"]["config"]["model"]["note"] = RunsCode(touch_source(marker))
    torch.save(checkpoint, out)
    return out


def savetxt(marker: Path) -> dict:
    return {"_target_": "numpy.savetxt", "fname": str(marker), "X": [[1.0]]}


# Stored-config payloads (plain data, so they pass weights_only): (where, what), the key the error names.
CONFIG_PAYLOADS: dict[str, tuple[Callable[[dict, Path], None], str, str]] = {
    "savetxt_nested_in_model": (
        lambda cfg, m: cfg["model"].__setitem__("extra", savetxt(m)),
        "config.model.extra._target_",
        "numpy.savetxt",
    ),
    "savetxt_as_feature": (
        lambda cfg, m: cfg.__setitem__("feature", savetxt(m)),
        "config.feature._target_",
        "numpy.savetxt",
    ),
    "savetxt_partial_as_model": (
        lambda cfg, m: cfg.__setitem__("model", {**savetxt(m), "_partial_": True}),
        "config.model._target_",
        "numpy.savetxt",
    ),
    "os_system_in_feature": (
        lambda cfg, m: cfg["feature"].__setitem__(
            "hook", {"_target_": "os.system", "_args_": [f"touch {m}"]}
        ),
        "config.feature.hook._target_",
        "os.system",
    ),
    "exec_in_a_list_of_args": (
        lambda cfg, m: cfg["model"].__setitem__(
            "conv1_kernel", [20, {"_target_": "builtins.exec", "_args_": [touch_source(m)]}]
        ),
        "config.model.conv1_kernel[1]._target_",
        "builtins.exec",
    ),
    "savetxt_inside_args": (
        lambda cfg, m: cfg["model"].__setitem__(
            "extra", {"_target_": "kws_lightning.models.build_model", "_args_": [savetxt(m)]}
        ),
        "config.model.extra._args_[0]._target_",
        "numpy.savetxt",
    ),
}


def config_payload(tiny_checkpoint: dict, out: Path, marker: Path, name: str) -> Path:
    checkpoint = plain_checkpoint(tiny_checkpoint)
    CONFIG_PAYLOADS[name][0](checkpoint["hyper_parameters"]["config"], marker)
    torch.save(checkpoint, out)
    return out


def data_payload(tiny_checkpoint: dict, out: Path, marker: Path) -> Path:
    """Model config intact; the data config (rebuilt by `eval` without input=DIR) writes a file."""
    checkpoint = plain_checkpoint(tiny_checkpoint)
    checkpoint["hyper_parameters"]["config"]["data"]["augment"] = savetxt(marker)
    torch.save(checkpoint, out)
    return out


# Unsafe loading forced on wherever torch lets an environment variable turn it on.
HOSTILE_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": "1"}


def cli_overrides(entry: str, ckpt: Path, tiny_checkpoint: dict, tmp_path: Path) -> list[str]:
    """What each CLI needs to reach the point where it opens `ckpt`."""
    common = [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"]
    wav = sorted((tiny_checkpoint["data_root"] / "yes").glob("*.wav"))[0]
    if entry == "eval":
        return [*common, f"paths.cache_dir={tiny_checkpoint['cache_dir']}"]
    if entry == "predict":
        folder = tmp_path / "clips"
        folder.mkdir(exist_ok=True)
        shutil.copy(wav, folder / wav.name)
        return [*common, f"input={folder}", f"out={tmp_path / 'submission.csv'}"]
    if entry == "export":
        return [*common, "format=torchscript", f"out={tmp_path / 'model.pt'}"]
    if entry == "listen":
        audio, rate = sf.read(wav, dtype="int16")
        long = tmp_path / "long.wav"
        sf.write(long, np.concatenate([np.zeros(rate, np.int16), audio, np.zeros(rate, np.int16)]), rate)
        return [*common, f"input={long}"]
    raise ValueError(entry)


def assert_refused(result: subprocess.CompletedProcess, ckpt: Path, marker: Path, *reasons: str) -> None:
    assert not marker.exists(), "the checkpoint ran code"
    assert result.returncode != 0, result.stdout[-2000:]
    message = result.stderr[-4000:]
    # One line naming the file and why, not a traceback (kws_lightning/utils/cli_errors.py).
    assert f"error: checkpoint {ckpt} is refused" in message and "Traceback" not in result.stderr, message
    for reason in reasons:
        assert reason in message, message


ENTRIES = ["eval", "predict", "export", "listen"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_cli_refuses_a_pickled_payload(
    entry: str, run_cli: Any, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    marker = tmp_path / MARKER
    ckpt = pickle_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker)
    result = run_cli(
        entry, *cli_overrides(entry, ckpt, tiny_checkpoint, tmp_path), cwd=tmp_path, env=HOSTILE_ENV
    )
    assert_refused(result, ckpt, marker, "a reference to exec", "data, not code")


@pytest.mark.parametrize("entry", ENTRIES)
def test_cli_refuses_a_stored_config_target(
    entry: str, run_cli: Any, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    marker = tmp_path / MARKER
    ckpt = config_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker, "savetxt_nested_in_model")
    result = run_cli(
        entry, *cli_overrides(entry, ckpt, tiny_checkpoint, tmp_path), cwd=tmp_path, env=HOSTILE_ENV
    )
    assert_refused(result, ckpt, marker, "config.model.extra._target_", "'numpy.savetxt'")


def test_eval_refuses_a_stored_data_config_target(
    run_cli: Any, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    marker = tmp_path / MARKER
    ckpt = data_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker)
    result = run_cli(
        "eval", *cli_overrides("eval", ckpt, tiny_checkpoint, tmp_path), cwd=tmp_path, env=HOSTILE_ENV
    )
    assert_refused(result, ckpt, marker, "config.data.augment._target_", "'numpy.savetxt'")


def test_train_resume_refuses_a_pickled_payload(run_cli: Any, tiny_checkpoint: dict, tmp_path: Path) -> None:
    # Lightning passes weights_only=None, which the env var turns into an unsafe load unless train says True.
    marker = tmp_path / MARKER
    ckpt = pickle_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker)
    result = run_cli(
        "train",
        *tiny_checkpoint["overrides"],
        *TINY_TRAIN_OVERRIDES,
        "trainer.max_epochs=6",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=HOSTILE_ENV,
    )
    assert_refused(result, ckpt, marker, "a reference to exec")
    assert "Epoch" not in result.stdout and not list((tmp_path / "run").rglob("*.ckpt"))


PYTHON_API: dict[str, Callable[[Path], Any]] = {
    "Predictor.from_checkpoints": lambda path: Predictor.from_checkpoints(path, "cpu"),
    "load_checkpoint_model": load_checkpoint_model,
    "KWSLightningModule.from_checkpoint": KWSLightningModule.from_checkpoint,
}


@pytest.mark.parametrize("api", sorted(PYTHON_API))
def test_python_api_refuses_a_pickled_payload(api: str, tiny_checkpoint: dict, tmp_path: Path) -> None:
    marker = tmp_path / MARKER
    ckpt = pickle_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker)
    with pytest.raises(CheckpointError, match="a reference to exec") as error:
        PYTHON_API[api](ckpt)
    assert f"checkpoint {ckpt} is refused" in str(error.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="is refused"):
        check_resume_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("api", sorted(PYTHON_API))
@pytest.mark.parametrize("payload", sorted(CONFIG_PAYLOADS))
def test_python_api_refuses_stored_config_targets(
    api: str, payload: str, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    marker = tmp_path / MARKER
    ckpt = config_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker, payload)
    _, key, target = CONFIG_PAYLOADS[payload]
    with pytest.raises(CheckpointError) as error:
        PYTHON_API[api](ckpt)
    message = str(error.value)
    assert f"checkpoint {ckpt} is refused" in message and f"{key} names {target!r}" in message, message
    assert not marker.exists()


def test_eval_data_module_is_built_through_the_registry(tiny_checkpoint: dict, tmp_path: Path) -> None:
    marker = tmp_path / MARKER
    ckpt = data_payload(tiny_checkpoint, tmp_path / "hostile.ckpt", marker)
    predictor = Predictor.from_checkpoints(ckpt, "cpu")  # the model config is intact
    with pytest.raises(CheckpointError, match=r"config\.data\.augment\._target_ names 'numpy\.savetxt'"):
        datamodule_test_set(predictor, str(tiny_checkpoint["cache_dir"]), 32, 0)
    assert not marker.exists()


def test_stored_configs_refuse_hydra_options_and_odd_targets(tmp_path: Path) -> None:
    feature = {"_target_": "kws_lightning.features.MFCC"}
    cases = {
        "_recursive_": ({**feature, "_recursive_": False}, "config.feature._recursive_"),
        "_convert_": ({**feature, "_convert_": "all"}, "config.feature._convert_"),
        "not a string": ({"_target_": 3}, "config.feature._target_ names 3"),
        "partial not bool": ({**feature, "_partial_": "yes"}, "config.feature._partial_"),
        "network as feature": ({"_target_": "kws_lightning.models.build_model"}, "config.feature._target_"),
    }
    for name, (node, expected) in cases.items():
        with pytest.raises(CheckpointError, match="refused") as error:
            build_stored({"feature": node}, "feature", tmp_path / "x.ckpt")
        assert expected in str(error.value), name
    with pytest.raises(CheckpointError, match="not a config with a _target_"):
        build_stored({"feature": {"n_mfcc": 40}}, "feature", tmp_path / "x.ckpt")


def test_a_real_checkpoint_is_plain_data_and_loads_everywhere(tiny_checkpoint: dict) -> None:
    """Guard: what a real run writes (Lightning's loops, ModelCheckpoint state, optimiser and schedule,
    hyper-parameters) needs no allow-listed global, so weights_only=True opens it."""
    for path in [tiny_checkpoint["ckpt"], tiny_checkpoint["run_dir"] / "checkpoints" / "last.ckpt"]:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        assert check_resume_checkpoint(path) == path
        assert load_checkpoint(path)["hyper_parameters"]["labels"]
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    module = KWSLightningModule.from_checkpoint(tiny_checkpoint["ckpt"]).eval()
    waves = torch.randn(2, predictor.clip_samples) * 0.1
    torch.testing.assert_close(predictor.posteriors(waves), torch.softmax(module(waves), dim=-1))


def test_module_hyper_parameters_are_plain_even_from_a_dictconfig(tmp_path: Path) -> None:
    """A config handed in as a DictConfig is stored as plain containers, so its checkpoints stay loadable
    with weights_only=True."""
    config = OmegaConf.create({"model": {"name": "x", "kernel": [3, 3]}, "seed": "${model.name}"})
    module = KWSLightningModule(torch.nn.Linear(4, 3), ["a", "b", "c"], config=config)
    assert module.hparams["config"] == {"model": {"name": "x", "kernel": [3, 3]}, "seed": "x"}
    torch.save(dict(module.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["config"]["seed"] == "x"


def test_checkpoint_payload_helpers_really_run_code(tiny_checkpoint: dict, tmp_path: Path) -> None:
    """The planted payloads are live: an unsafe load, or Hydra on the stored config, creates the marker."""
    from hydra.utils import instantiate

    marker = tmp_path / MARKER
    torch.load(pickle_payload(tiny_checkpoint, tmp_path / "a.ckpt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    stored = torch.load(
        config_payload(tiny_checkpoint, tmp_path / "b.ckpt", marker, "savetxt_nested_in_model"),
        weights_only=True,
    )
    instantiate(copy.deepcopy(stored["hyper_parameters"]["config"]["model"]["extra"]))
    assert marker.exists()


def narrower_module(tiny_checkpoint: dict) -> KWSLightningModule:
    """The tiny checkpoint's model at half its width (model.n_feature_maps=8): same names, other shapes."""
    from kws_lightning.checkpoints import build_checkpoint_model

    checkpoint = plain_checkpoint(tiny_checkpoint)
    checkpoint["hyper_parameters"]["config"]["model"]["n_feature_maps"] = 8
    model, hparams = build_checkpoint_model(checkpoint, tiny_checkpoint["ckpt"])
    return KWSLightningModule(model, hparams["labels"])


def test_resume_checks_the_weights_fit_the_model(tiny_checkpoint: dict) -> None:
    """Before: Lightning's strict load failed with a RuntimeError listing tensor shapes, after the data was
    prepared, naming neither the checkpoint nor the fix."""
    ckpt = tiny_checkpoint["ckpt"]
    same = KWSLightningModule.from_checkpoint(ckpt)
    assert check_resume_checkpoint(ckpt, same) == ckpt
    with pytest.raises(CheckpointError, match="belongs to another model or config") as narrower:
        check_resume_checkpoint(ckpt, narrower_module(tiny_checkpoint))
    assert str(ckpt) in str(narrower.value) and "other shapes model.net." in str(narrower.value)
    assert "config_resolved.yaml" in str(narrower.value)
    with pytest.raises(
        CheckpointError, match=r"missing model\.weight, model\.bias \(2\); unexpected model\."
    ):
        check_resume_checkpoint(ckpt, KWSLightningModule(torch.nn.Linear(4, 3), ["a", "b", "c"]))


def test_train_resume_into_another_model_is_one_line(
    run_cli: Any, tiny_checkpoint: dict, tmp_path: Path
) -> None:
    ckpt = tiny_checkpoint["ckpt"]
    result = run_cli(
        "train",
        *tiny_checkpoint["overrides"],
        *TINY_TRAIN_OVERRIDES,
        "model.n_feature_maps=8",  # the checkpoint's is 16
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"error: checkpoint {ckpt} belongs to another model or config" in result.stderr, result.stderr[
        -3000:
    ]
    assert "Traceback" not in result.stderr and "Epoch" not in result.stdout


def test_a_stored_data_config_never_chooses_where_files_go(tiny_checkpoint: dict, tmp_path: Path) -> None:
    """Before: eval rebuilt the data module with the checkpoint's keep_caches (=1 here: every other cache in
    the user's cache folder deleted), and export quantize=int8 decoded into the checkpoint's cache_dir. Now
    the command's cache_dir is used, nothing is pruned, reported or downloaded where the file says."""
    from kws_lightning.quantize import calibration_waves

    checkpoint = plain_checkpoint(tiny_checkpoint)
    data = checkpoint["hyper_parameters"]["config"]["data"]
    stored_cache, stored_reports = tmp_path / "the_checkpoints_cache", tmp_path / "the_checkpoints_reports"
    data.update(cache_dir=str(stored_cache), keep_caches=1, report_dir=str(stored_reports))
    ckpt = tmp_path / "stored_paths.ckpt"
    torch.save(checkpoint, ckpt)
    mine = tmp_path / "my_cache"
    others = [mine / f"waves-{name}" for name in ("other_project", "older_run")]
    for folder in others:
        folder.mkdir(parents=True)
        (folder / "done.json").write_text("{}")  # a complete cache, as wave_cache marks one
    # The session's synthetic speech (data=synthetic keeps it in the cache folder): not generated again.
    shutil.copytree(tiny_checkpoint["cache_dir"], mine, dirs_exist_ok=True)
    before = sorted(mine.iterdir())

    predictor = Predictor.from_checkpoints(ckpt, "cpu")
    test_set = datamodule_test_set(predictor, str(mine), 64, 0)
    assert len(test_set.names) > 0
    waves = calibration_waves(predictor, 8, cache_dir=str(mine))
    assert waves.shape == (8, predictor.clip_samples)
    assert set(before) <= set(mine.iterdir()), "the user's other caches were pruned"
    assert not stored_cache.exists() and not stored_reports.exists()
