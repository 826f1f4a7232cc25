"""`data.extra_training_roots` (issue 16): more training material (e.g. espeak-ng speech) mixed into a data
set. Its clips join the training split only; the validation, test and cv held-out draws stay exactly as
without them; bad folders are clear errors; train, eval and cv take the override."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from training_helpers import CONF_DIR, check_ok

from kws_lightning.data.datamodule import SpeechCommandsDataModule
from kws_lightning.data.index import DataLayoutError
from kws_lightning.labels import UNKNOWN
from kws_lightning.utils.sweep_job import register_resolvers

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
# What the extra folder holds: clips copied from the synthetic set, each word folder -> (source word, count).
# "yes" / "go" are keywords, "marvin" an unknown word the main set has too, "zebra" one it lacks.
EXTRA_WORDS = {"yes": ("yes", 3), "go": ("go", 2), "marvin": ("marvin", 2), "zebra": ("bed", 4)}


def make_extra_root(main: Path, dest: Path) -> Path:
    """A second training-layout folder: real synthetic clips of `main` copied under new speaker ids, with
    its own validation / testing lists and background noise (which must all be ignored)."""
    for word, (source, count) in EXTRA_WORDS.items():
        for n, wav in enumerate(sorted((main / source).glob("*.wav"))[:count]):
            (dest / word).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wav, dest / word / f"e{n:07x}_nohash_0.wav")
    (dest / "validation_list.txt").write_text("yes/e0000000_nohash_0.wav\n")
    (dest / "testing_list.txt").write_text("go/e0000000_nohash_0.wav\nzebra/e0000001_nohash_0.wav\n")
    (dest / "_background_noise_").mkdir()
    shutil.copyfile(next((main / "_background_noise_").glob("*.wav")), dest / "_background_noise_" / "x.wav")
    return dest


@pytest.fixture(scope="module")
def extra_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_extra_root(synthetic_root, Path(tmp_path_factory.mktemp("extra")) / "espeak_more")


def datamodule(root: Path, cache: Path, **kwargs) -> SpeechCommandsDataModule:
    dm = SpeechCommandsDataModule(root=str(root), cache_dir=str(cache), batch_size=64, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("fold", [None, 1], ids=["folder_split", "cv_fold_1"])
def test_extra_clips_grow_training_and_leave_every_draw_unchanged(synthetic_root, extra_root, tmp_path, fold):
    cache = tmp_path / "cache"
    base = datamodule(synthetic_root, cache, fold=fold, num_folds=3)
    mixed = datamodule(synthetic_root, cache, fold=fold, num_folds=3, extra_training_roots=[str(extra_root)])
    n_base, n_extra = len(base.dataset.clips), sum(count for _, count in EXTRA_WORDS.values())

    # The main clips keep their rows (labels, splits, cache ids); the extras come after, all training.
    columns = ["path", "label", "target", "split", "cache_id", "source"]
    pd.testing.assert_frame_equal(mixed.dataset.clips.iloc[:n_base][columns], base.dataset.clips[columns])
    extra = mixed.dataset.clips.iloc[n_base:]
    assert len(extra) == n_extra
    assert set(extra["split"]) == {"training"} and set(extra["source"]) == {str(extra_root.resolve())}

    # Validation / test (or held-out fold) draws: the same items in the same order, the same silence clips,
    # the same waves in the loaders.
    for split in ("validation", "testing"):
        assert len(base.eval_items[split]) > 0
        np.testing.assert_array_equal(mixed.eval_items[split], base.eval_items[split])
        np.testing.assert_array_equal(mixed.eval_silence[split], base.eval_silence[split])
    for a, b in zip(base.val_dataloader(), mixed.val_dataloader(), strict=True):
        assert torch.equal(a["waves"], b["waves"]) and torch.equal(a["targets"], b["targets"])
    assert base.class_counts("testing") == mixed.class_counts("testing")

    # Training pool and epoch grew by exactly the extra clips: keywords into the epoch, the rest unknown.
    extra_ids = set(extra["cache_id"])
    extra_keyword_ids = set(extra.loc[extra["label"] != UNKNOWN, "cache_id"])
    assert set(mixed.train_sampler.known_ids) == set(base.train_sampler.known_ids) | extra_keyword_ids
    assert set(mixed.train_sampler.unknown_ids) == set(base.train_sampler.unknown_ids) | (
        extra_ids - extra_keyword_ids
    )
    counts, grown = base.class_counts("training"), mixed.class_counts("training")
    assert grown["yes"] == counts["yes"] + 3 and grown["go"] == counts["go"] + 2
    assert grown["no"] == counts["no"]
    assert mixed.train_sampler.epoch_size > base.train_sampler.epoch_size
    assert f"extra training clips: {n_extra} (6 unknown)" in mixed.describe()
    assert "extra training clips" not in base.describe()
    assert mixed.index_hash() != base.index_hash()


def test_extra_word_folders_are_labelled_like_the_main_roots(synthetic_root, extra_root, tmp_path):
    dm = datamodule(synthetic_root, tmp_path / "cache", extra_training_roots=[str(extra_root)])
    clips = dm.dataset.clips
    extra = clips[clips["source"] == str(extra_root.resolve())]
    labels = dict(zip(extra["word"], extra["label"], strict=False))
    assert labels == {"yes": "yes", "go": "go", "marvin": UNKNOWN, "zebra": UNKNOWN}
    assert (extra["target"] == extra["label"].map(dm.labels.index)).all()
    # Its own lists name yes/e0000000 (validation) and go/, zebra/ clips (testing): all train anyway.
    listed = extra[extra["rel"].isin(["yes/e0000000_nohash_0.wav", "go/e0000000_nohash_0.wav"])]
    assert len(listed) == 2 and set(listed["split"]) == {"training"}
    # Its _background_noise_ is not used: the noise bank is the main root's.
    assert all(str(extra_root) not in str(path) for path in dm.dataset.noise_files)
    assert dm.dataset.noise_files and dm.dataset.extra_roots == [extra_root.resolve()]


def test_bad_extra_folders_are_clear_errors(synthetic_root, tmp_path):
    cache = tmp_path / "cache"
    missing = tmp_path / "not_generated_yet"
    with pytest.raises(DataLayoutError, match=rf"{missing}.*does not exist.*data\.extra_training_roots"):
        datamodule(synthetic_root, cache, extra_training_roots=[str(missing)])
    noise_only = tmp_path / "noise_only"
    (noise_only / "_background_noise_").mkdir(parents=True)
    shutil.copyfile(
        next((synthetic_root / "_background_noise_").glob("*.wav")),
        noise_only / "_background_noise_" / "n.wav",
    )
    with pytest.raises(DataLayoutError, match=rf"{noise_only} has no word folders.*synthetic out=DIR"):
        datamodule(synthetic_root, cache, extra_training_roots=[str(noise_only)])
    # The main root again would train on its own validation / test clips.
    with pytest.raises(DataLayoutError, match="is data.root or is listed twice"):
        datamodule(synthetic_root, cache, extra_training_roots=[str(synthetic_root)])
    with pytest.raises(ValueError, match=r"give a list, data.extra_training_roots=\["):
        SpeechCommandsDataModule(root=str(synthetic_root), extra_training_roots=str(noise_only))


def test_cv_passes_the_override_to_every_fold_and_checks_the_folder(synthetic_overrides, tmp_path):
    from kws_lightning.jobs.cv_folds import CVError, fold_command
    from kws_lightning.jobs.cv_run import settings_from

    register_resolvers()

    def settings(folder: Path):
        given = ["experiment=quickstart", *synthetic_overrides, f"data.extra_training_roots=[{folder}]"]
        # Hydra resolves ${hydra:runtime.output_dir} only inside a run: the test gives the path.
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="cv", overrides=["k=3", f"paths.output_dir={tmp_path}", *given])
        return settings_from(cfg, ["k=3", *given])

    folder = tmp_path / "extra"
    (folder / "yes").mkdir(parents=True)
    passed = settings(folder).train_overrides
    assert f"data.extra_training_roots=[{folder}]" in passed
    assert f"data.extra_training_roots=[{folder}]" in fold_command(passed, 2, 3, tmp_path / "fold_2", False)
    with pytest.raises(CVError, match=rf"{tmp_path / 'gone'}, which is not a folder"):
        settings(tmp_path / "gone")


# A few optimiser steps: a real run through the CLI, not a good model.
TINY = [
    "experiment=quickstart",
    "model.n_feature_maps=8",
    "data.batch_size=32",
    "trainer.max_steps=3",
    "trainer.max_epochs=1",
    "scheduler.warmup_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
]


def test_train_with_extra_roots_then_eval_with_without_and_after_they_are_gone(
    synthetic_overrides, synthetic_root, run_cli, tmp_path
):
    from kws_lightning.checkpoints import load_checkpoint
    from kws_lightning.eval import datamodule_test_set
    from kws_lightning.inference import Predictor

    extra = make_extra_root(synthetic_root, tmp_path / "espeak_more")
    env = {"OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    args = [
        *synthetic_overrides,
        *TINY,
        f"hydra.run.dir={run_dir}",
        "data.extra_training_roots=[espeak_more]",
    ]
    out = check_ok(run_cli("train", *args, cwd=tmp_path, env=env))
    assert f"extra training clips: 11 (6 unknown) from {extra.resolve()}" in out
    ckpt = re.search(r"^best checkpoint: (.+)$", out, re.M).group(1).strip()
    test_acc = float(re.search(r"test/acc ([0-9.]+)", out).group(1))
    # Recorded absolute, so eval finds it from any directory.
    stored = load_checkpoint(ckpt)["hyper_parameters"]["config"]["data"]["extra_training_roots"]
    assert stored == [str(extra.resolve())]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The synthetic main set lives in the cache dir: eval reads it there rather than generating it again.
    cache = next(o for o in synthetic_overrides if o.startswith("paths.cache_dir="))
    scored = check_ok(run_cli("eval", f"ckpt_path={ckpt}", cache, cwd=elsewhere, env=env))
    assert float(re.search(r"accuracy ([0-9.]+)", scored).group(1)) == pytest.approx(test_acc, abs=1e-4)
    # eval's extra_training_roots=[] (here in-process: one CLI run fewer) scores the very same draw.
    predictor = Predictor.from_checkpoints(ckpt, "cpu")
    cache_dir = cache.split("=", 1)[1]
    own, without = (
        datamodule_test_set(predictor, cache_dir, 64, 0, extra_training_roots=roots) for roots in (None, [])
    )
    assert own.names == without.names and len(own.names) > 0
    for a, b in zip(own.batches, without.batches, strict=True):
        assert torch.equal(a["waves"], b["waves"]) and torch.equal(a["targets"], b["targets"])

    extra.rename(tmp_path / "moved")
    gone = run_cli("eval", f"ckpt_path={ckpt}", cache, cwd=elsewhere, env=env)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert f"error: extra training folder {extra.resolve()} does not exist" in gone.stderr
    assert "extra_training_roots=[])" in gone.stderr
