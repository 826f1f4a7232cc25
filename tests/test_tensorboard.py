"""What a short `python -m kws_lightning.train` run leaves in TensorBoard, read back from the event files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from kws_lightning.labels import make_labels

LABELS = make_labels()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory, synthetic_overrides: list[str]) -> EventAccumulator:
    """6 steps, validation every 3 (twice), then the test of the best checkpoint."""
    cwd = tmp_path_factory.mktemp("tb")
    run_dir = cwd / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kws_lightning.train",
            *synthetic_overrides,
            f"paths.log_dir={cwd / 'logs'}",
            f"hydra.run.dir={run_dir}",
            "model.n_feature_maps=8",
            "data.batch_size=16",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.check_val_every_n_epoch=null",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_for_every_metric(events: EventAccumulator) -> None:
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/acc", "train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc"}
    expected |= {"val/acc_best", "test/loss", "test/acc", "lr-SGD"}
    assert expected <= scalars, sorted(scalars)
    assert len(events.Scalars("train/loss")) == 6  # every step (log_every_n_steps=1)
    assert len(events.Scalars("val/acc")) == 2
    assert [e.value for e in events.Scalars("lr-SGD")] == pytest.approx([0.005] * 6)
    best = [e.value for e in events.Scalars("val/acc_best")]
    accs = [e.value for e in events.Scalars("val/acc")]
    assert best == [accs[0], max(accs)]


def test_confusion_matrix_and_feature_images(events: EventAccumulator) -> None:
    images = set(events.Tags()["images"])
    confusion = events.Images("val/confusion_matrix")
    assert len(confusion) == 2  # one per validation
    assert confusion[0].width > 200 and confusion[0].height > 200
    features = {tag for tag in images if tag.startswith("features/")}
    # One clip per class that the validation split holds: every keyword, and silence/unknown.
    assert features == {f"features/{label}" for label in LABELS}, sorted(images)
    yes = events.Images("features/yes")
    assert len(yes) == 1  # logged once: the features of fixed clips do not change
    assert yes[0].width == 101  # MFCC frames along x


def test_hparams_view_has_config_and_final_metrics(events: EventAccumulator) -> None:
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model/name"].string_value == "cnn_trad_pool2"
    assert hparams["optimizer/lr"].number_value == pytest.approx(0.005)
    assert hparams["data/batch_size"].number_value == 16
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {info.name.tag for info in experiment.experiment.metric_infos}
    assert {"hp/val_acc_best", "hp/test_acc", "hp/test_loss"} <= metric_tags
    # The HParams metrics hold the run's final values.
    test_acc = events.Scalars("test/acc")[-1].value
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(test_acc)
    assert events.Scalars("hp/val_acc_best")[-1].value == pytest.approx(
        events.Scalars("val/acc_best")[-1].value
    )
    assert np.isfinite(events.Scalars("hp/test_loss")[-1].value)
