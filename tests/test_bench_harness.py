"""benchmarks/run_all.py: figure lines collected from the scripts, the README table merged by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_common  # noqa: E402
import run_all  # noqa: E402

TABLE = f"# Benchmarks\n\nintro\n\n{run_all.TABLE_START}\n{run_all.TABLE_END}\n\nafter the table\n"


def test_parse_figures_keeps_only_name_value_unit_lines() -> None:
    out = "setup: 2 threads\nfoo_rate 12.5 clips/s\nbar: 3 s\nBad 1 x\nratio 0.0034 x\nwith extra 1 x y\n"
    figures = run_all.parse_figures(out, "cmd")
    assert [(f.name, f.value, f.unit) for f in figures] == [
        ("foo_rate", "12.5", "clips/s"),
        ("ratio", "0.0034", "x"),
    ]
    assert all(f.command == "cmd" for f in figures)


def test_figure_prints_a_parseable_line_and_refuses_bad_names(capsys: pytest.CaptureFixture[str]) -> None:
    bench_common.figure("kaggle_test_minutes_best", 1.7734, "min")
    bench_common.figure("predict_clips_per_s_best", 1490.4, "clips/s")
    printed = capsys.readouterr().out
    assert [f.value for f in run_all.parse_figures(printed, "")] == ["1.77", "1490"]
    with pytest.raises(ValueError, match="lower_snake_case"):
        bench_common.figure("Bad Name", 1.0, "x")
    with pytest.raises(ValueError, match="one-word unit"):
        bench_common.figure("ok", 1.0, "clips per s")


def test_rewrite_table_replaces_own_rows_and_keeps_others(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(TABLE)
    first = [
        run_all.Figure("scale_epoch_s", "90", "s", "python a.py"),
        run_all.Figure("x_rate", "5", "1/s", "b"),
    ]
    run_all.rewrite_table(readme, first, "machine A", "2026-01-01 00:00")
    run_all.rewrite_table(
        readme, [run_all.Figure("x_rate", "7", "1/s", "b --quick")], "machine B", "2026-01-02 00:00"
    )
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `scale_epoch_s` | 90 | s | machine A | 2026-01-01 00:00 | `python a.py` |",
        "| `x_rate` | 7 | 1/s | machine B | 2026-01-02 00:00 | `b --quick` |",
    ]
    assert text.startswith("# Benchmarks\n\nintro") and text.endswith("after the table\n")


def test_rewrite_table_without_markers_names_the_fix(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    with pytest.raises(SystemExit, match="bench-table:start"):
        run_all.rewrite_table(readme, [], "m", "d")


def test_run_collects_a_quick_script_and_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(TABLE)
    quick = run_all.Bench(
        "frontend", "frontend_speed.py", ("--batch", "2", "--seconds", "0.01", "--threads", "1")
    )
    assert run_all.run([quick], readme) == 0
    printed = run_all.parse_figures(capsys.readouterr().out, "")
    names = {f.name for f in printed}
    assert {"mfcc_torch_cpu_batch2", "logmel_torch_cpu_batch2", "mfcc_reference_per_clip_cpu"} <= names
    assert "bench_wall_s" in names
    assert all(float(f.value) > 0 for f in printed)
    text = readme.read_text()
    assert "| `mfcc_torch_cpu_batch2` |" in text
    assert "`python benchmarks/frontend_speed.py --batch 2 --seconds 0.01 --threads 1`" in text


def test_a_failing_script_fails_the_run_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KWS_BENCH_CACHE", str(tmp_path / "cache"))
    readme = tmp_path / "README.md"
    readme.write_text(TABLE)
    broken = run_all.Bench("broken", "predict_throughput.py", ("--models", "no_such_model", "--clips", "1"))
    assert run_all.run([broken], readme) == 1
    assert "| `" not in readme.read_text()  # nothing measured, nothing written


def test_every_registered_model_has_a_recipe_config() -> None:
    import kws_lightning.models  # noqa: F401
    from kws_lightning.models.registry import available_models

    for name in available_models():
        cfg = bench_common.compose_recipe(name)
        assert cfg.model.name == name, (
            f"{name}: recipe {bench_common.RECIPES.get(name)} builds {cfg.model.name}"
        )
        assert int(cfg.data.batch_size) > 0
    assert bench_common.compose_recipe("best").model.width_multiplier == 1.5


def test_augment_cost_prints_every_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(TABLE)
    quick = run_all.Bench(
        "augment",
        "augment_cost.py",
        ("--recipe", "tc_resnet14", "--batch", "8", "--steps", "1", "--rounds", "1"),
    )
    assert run_all.run([quick], readme) == 0
    printed = {f.name: float(f.value) for f in run_all.parse_figures(capsys.readouterr().out, "")}
    options = ("recipe", "speed", "reverb_p05", "reverb_p1", "stream")
    assert {f"augment_ms_{o}" for o in options} | {"augment_train_step_ms_tc_resnet14"} <= set(printed)
    assert all(printed[f"augment_ms_{o}"] > 0 for o in options)
    assert printed["frontend_ms_plain"] > 0 and printed["frontend_ms_vtlp"] > 0
    share = printed["augment_step_share_reverb_p1"]
    assert share == pytest.approx(
        printed["augment_ms_reverb_p1"] / printed["augment_train_step_ms_tc_resnet14"], rel=0.05
    )
