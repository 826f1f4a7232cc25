"""Config validation (kws_lightning/config_check.py, utils/static_signature.py): bad values fail at start-up
naming the key, the value and what is allowed; every shipped recipe, group choice and search-space value
passes; the check reads signatures without importing torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kws_lightning.config_check import ConfigError, find_problems, validate_train_config
from kws_lightning.utils.static_signature import check_value, read_signature
from kws_lightning.utils.sweep_job import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
# Hydra resolves ${hydra:runtime.output_dir} only inside a run: tests give the path.
BASE = ["paths.output_dir=/tmp/kws-config-check", "data.root=/tmp/kws-dummy-root"]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[*BASE, *overrides])


def problems_of(*overrides: str) -> dict[str, str]:
    return {p.key: str(p) for p in find_problems(compose(*overrides))}


# ---- every shipped config passes ---


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


RECIPES = [f"experiment={name}" for name in _choices("experiment")]
SEARCHES = [f"hparams_search={name}" for name in _choices("hparams_search")]
GROUP_CHOICES = [
    f"{group}={name}"
    for group in ("data", "feature", "augment", "spec_augment", "mixup", "vtlp", "loss", "model", "optimizer")
    + ("scheduler", "trainer", "logger")
    for name in _choices(group)
] + ["callbacks=[default,ema]", "callbacks=[default,swa]"]


@pytest.mark.parametrize("choice", RECIPES + GROUP_CHOICES)
def test_every_recipe_and_group_choice_passes(choice: str) -> None:
    assert problems_of(choice) == {}


def _search_points(search: str) -> list[list[str]]:
    """Each value of a search space's choice(...) and both ends of its interval(...), as overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep

    params = OmegaConf.load(CONF / "hparams_search" / f"{search}.yaml").hydra.sweeper.params
    points = []
    for key, space in params.items():
        sweep = OverridesParser.create().parse_override(f"{key}={space}").value()
        if isinstance(sweep, ChoiceSweep):
            values = list(sweep.list)
        elif isinstance(sweep, IntervalSweep):
            values = [sweep.start, sweep.end]
        else:
            raise AssertionError(f"{search}: unexpected search space {key}: {space}")
        points += [[f"{key}={value}"] for value in values]
    return points


@pytest.mark.parametrize("search", _choices("hparams_search"))
def test_every_search_space_value_passes(search: str) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")
    for point in _search_points(search):
        assert problems_of(f"hparams_search={search}", *point) == {}, point


# ---- bad values: the key, the value, what is allowed ---

BAD = [
    (["data.batch_size=abc"], "data.batch_size", ["data.batch_size='abc'", "expected int"]),
    (["data.batch_size=0"], "data.batch_size", ["data.batch_size=0", "a number >= 1"]),
    (["data.batch_size=2.5"], "data.batch_size", ["data.batch_size=2.5", "expected int"]),
    (["data.sample_rate=8000"], "data.sample_rate", ["data.sample_rate=8000", "feature.sample_rate=16000"]),
    (["data.sample_rate=0"], "data.sample_rate", ["data.sample_rate=0", "a number >= 1"]),
    (["data.num_workers=-1"], "data.num_workers", ["data.num_workers=-1", ">= 0"]),
    (["data.clip_duration_s=0"], "data.clip_duration_s", ["data.clip_duration_s=0", "> 0"]),
    (
        ["data.validation_percentage=60", "data.testing_percentage=50"],
        "data.validation_percentage",
        ["=60 + data.testing_percentage=50 = 110", "below 100"],
    ),
    (["data.keywords=[yes,yes]"], "data.keywords", ["keywords repeat ['yes']"]),
    (["data.keywords=yes"], "data.keywords", ["data.keywords='yes'", "Sequence[str]"]),
    (["data=speech_commands", "data.root=null"], "data.root", ["no data", "data.root=PATH"]),
    (["feature.n_mfcc=80"], "feature.n_mfcc", ["feature.n_mfcc=80", "allowed 1..40"]),
    (["feature.fmax=9000"], "feature.fmax", ["feature.fmax=9000", "allowed up to 8000"]),
    (["feature.hop_length=0"], "feature.hop_length", ["feature.hop_length=0", ">= 1"]),
    (["feature.pad_mode=zeros"], "feature.pad_mode", ["'zeros'", "one of ['constant','reflect']"]),
    (
        ["feature.normalize=per_clip"],
        "feature.normalize",
        ["'per_clip'", "one of ['none','per_utterance','dataset']"],
    ),
    (["augment.time_shift.p=1.5"], "augment.time_shift.p", ["augment.time_shift.p=1.5", "[0, 1]"]),
    (["augment.noise.max_gain=-1"], "augment.noise.max_gain", ["augment.noise.max_gain=-1", ">= 0"]),
    (["augment.noise.enabled=maybe"], "augment.noise.enabled", ["'maybe'", "expected bool"]),
    (["optimizer.lr=-1"], "optimizer.lr", ["optimizer.lr=-1", "a number > 0"]),
    (["optimizer.lr=abc"], "optimizer.lr", ["optimizer.lr='abc'", "a number > 0"]),
    # NaN passes every comparison, inf every lower bound: refused wherever they appear.
    (["optimizer.lr=nan"], "optimizer.lr", ["optimizer.lr=nan", "expected a finite number"]),
    (["optimizer.lr=inf"], "optimizer.lr", ["optimizer.lr=inf", "expected a finite number"]),
    (["data.clip_duration_s=inf"], "data.clip_duration_s", ["data.clip_duration_s=inf", "a finite number"]),
    (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas", ["optimizer.betas=[0.9]", "tuple["]),
    (["scheduler=cosine", "scheduler.warmup_steps=-5"], "scheduler.warmup_steps", [">= 0"]),
    (["trainer.max_epochs=abc"], "trainer.max_epochs", ["trainer.max_epochs='abc'", "int"]),
    (["trainer.max_steps=0"], "trainer.max_steps", ["trainer.max_steps=0", "or -1 (-1: no limit"]),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", [">= 1"]),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval", ["an int >= 1 (batches)"]),
    (["trainer.check_val_every_n_epoch=null"], "trainer.val_check_interval", ["needs an int"]),
    (["+data.batch_sise=3"], "data.batch_sise", ["has no parameter 'batch_sise'", "did you mean batch_size"]),
    (["seed=null"], "data.seed", ["data.seed=null", "expected int", "comes from ${seed}"]),
]


@pytest.mark.parametrize(("overrides", "key", "texts"), BAD, ids=[" ".join(case[0]) for case in BAD])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(
    overrides: list[str], key: str, texts: list[str]
) -> None:
    problems = problems_of(*overrides)
    assert key in problems, problems
    for text in texts:
        assert text in problems[key], problems[key]
    with pytest.raises(ConfigError, match="invalid config"):
        validate_train_config(compose(*overrides))


def test_a_missing_mandatory_value_is_named() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["paths.output_dir=/tmp/x", "data=speech_commands"])
    problems = {p.key: str(p) for p in find_problems(cfg)}
    assert problems == {"data.root": "data.root is required: set it, e.g. data.root=VALUE"}


def test_a_partial_may_leave_a_required_argument_null() -> None:
    # scheduler.total_steps: null is filled in from the trainer (KWSLightningModule.configure_optimizers).
    assert problems_of("scheduler=poly_hold") == {}
    assert "scheduler.total_steps" in problems_of("scheduler=poly_hold", "scheduler.total_steps=abc")


# ---- signatures are read, not listed ---


def test_a_new_constructor_parameter_is_checked_without_touching_the_checker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a data.verify_cache / feature.normalize added by someone else gets: its hint is enforced."""
    (tmp_path / "fresh_target.py").write_text(
        "from typing import Literal\n"
        "class Thing:\n"
        "    def __init__(self, size: int = 1, mode: Literal['full', 'quick', 'off'] = 'quick',\n"
        "                 limit: float | None = None) -> None:\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = OmegaConf.create(
        {"thing": {"_target_": "fresh_target.Thing", "size": 2, "mode": "slow", "limit": "x"}}
    )
    problems = {p.key: str(p) for p in find_problems(cfg)}
    assert problems == {
        "thing.mode": "thing.mode='slow': expected one of ['full','quick','off'] "
        "(Thing's mode: Literal['full', 'quick', 'off'])",
        "thing.limit": "thing.limit='x': expected float | None (Thing's limit: float | None)",
    }
    cfg.thing.update(mode="off", limit=2)
    assert find_problems(cfg) == []


@pytest.mark.parametrize(
    ("hint", "value", "expected"),
    [
        ("int", 3, True),
        ("int", True, False),
        ("int", 3.0, False),
        ("float", 3, True),
        ("float", "3", False),
        ("str | None", None, True),
        ("Sequence[str]", ["a"], True),
        ("Sequence[str]", "abc", False),
        ("tuple[float, float]", [0.9, 0.99], True),
        ("tuple[float, float]", [0.9], False),
        ("Optional[Union[int, float]]", 0.5, True),
        ("Mapping[str, Any] | None", {"a": 1}, True),
        ("Literal['a', 'b']", "c", False),
        ("float | Tensor", "abc", None),  # Tensor is not understood: cannot tell, never rejected
        ("SomeAlias", 1, None),
    ],
)
def test_check_value(hint: str, value: object, expected: bool | None) -> None:
    assert check_value(ast.parse(hint, mode="eval").body, value) is expected


def test_signatures_follow_re_exports_and_star_imports() -> None:
    assert {"lr", "momentum", "nesterov"} <= set(read_signature("torch.optim.SGD").params)
    assert "label_smoothing" in read_signature("torch.nn.CrossEntropyLoss").params  # via `import *`
    assert "max_epochs" in read_signature("pytorch_lightning.Trainer").params
    assert set(read_signature("kws_lightning.data.augment.AugmentConfig").params) >= {"noise", "time_shift"}
    assert read_signature("kws_lightning.no_such_module.Thing") is None


def test_validation_imports_neither_torch_nor_lightning() -> None:
    """The check runs before train() imports anything heavy: a bad config fails in about a second."""
    script = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from kws_lightning.config_check import find_problems\n"
        "from kws_lightning.utils.sweep_job import register_resolvers\n"
        "register_resolvers()\n"
        f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
        f"    cfg = compose('train', overrides={BASE + ['experiment=best', 'data.batch_size=abc']!r})\n"
        "problems = find_problems(cfg)\n"
        "print([p.key for p in problems], 'torch' in sys.modules, 'pytorch_lightning' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['data.batch_size'] False False"


# ---- the command line: fails before the data is touched ---

CLI_BAD = [
    (["data.batch_size=abc"], "data.batch_size='abc': expected int"),
    (["data.sample_rate=8000"], "data.sample_rate=8000 but feature.sample_rate=16000"),
    (["optimizer.lr=-1"], "optimizer.lr=-1: expected a number > 0"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': expected Optional[int]"),
    (["augment.time_shift.p=1.5"], "augment.time_shift.p=1.5: expected a number in [0, 1]"),
    (["feature.fmax=9000"], "feature.fmax=9000 is above the Nyquist frequency"),
    (["+data.batch_sise=3"], "data.batch_sise: SpeechCommandsDataModule has no parameter 'batch_sise'"),
    (["vtlp=default", "vtlp.p=2"], "vtlp.p=2: expected a number in [0, 1]"),
    (["optimizer.weight_decay=nan"], "optimizer.weight_decay=nan: expected a finite number"),
]
# One run reports every problem at once; data.sample_rate=0 needs a run of its own (the same key as above).
CLI_RUNS = {
    "every_problem_at_once": CLI_BAD,
    "sample_rate_0": [(["data.sample_rate=0"], "data.sample_rate=0: expected a number >= 1")],
}


@pytest.fixture(scope="module")
def empty_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with no clips: indexing it fails, so reaching the data at all shows in the error."""
    return tmp_path_factory.mktemp("empty_root")


@pytest.mark.parametrize("cases", CLI_RUNS.values(), ids=CLI_RUNS.keys())
def test_train_cli_rejects_bad_values_before_reading_data(
    cases: list[tuple[list[str], str]], empty_data_root: Path, run_cli: object, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "data=speech_commands",
        f"data.root={empty_data_root}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *(override for overrides, _ in cases for override in overrides),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout[-2000:]
    # One message, no traceback (kws_lightning/utils/cli_errors.py).
    assert "error: invalid config" in result.stderr and "Traceback" not in result.stderr, result.stderr[
        -3000:
    ]
    failed = json.loads((run_dir / "job_result.json").read_text())
    for _, message in cases:
        assert message in result.stderr, (message, result.stderr[-3000:])
    # The job record names the first problem (its error text is the exception's, shortened).
    assert failed["status"] == "failed" and cases[0][1] in failed["error"]
    # Nothing was indexed, decoded or cached (the empty root would have failed with a data error instead).
    assert not (tmp_path / "cache").exists()
    assert "DataLayoutError" not in result.stderr


def test_a_misspelt_key_fails_in_hydra_struct_mode(run_cli: object, tmp_path: Path) -> None:
    result = run_cli("train", "data.batch_sise=3", cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Could not override 'data.batch_sise'" in result.stderr
    assert "Key 'batch_sise' is not in struct" in result.stderr
