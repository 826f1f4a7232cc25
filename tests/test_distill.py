"""Knowledge distillation (kws_lightning/distill.py): the loss against a hand computation, the teachers'
checks (missing file, other classes, another CV fold), and a short distilled training run whose student
checkpoint holds no teacher and resumes, predicts and exports without the teacher file."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from training_helpers import check_ok

from kws_lightning.checkpoints import CheckpointError, load_checkpoint
from kws_lightning.distill import (
    Teachers,
    combine_losses,
    distillation_loss,
    load_teachers,
    same_front_end,
    teacher_paths,
)
from kws_lightning.inference import Predictor, load_checkpoint_model
from kws_lightning.labels import make_labels
from kws_lightning.mixup import Mixup
from kws_lightning.module import KWSLightningModule

LABELS = make_labels()


def fake_datamodule(fold: int | None = None, num_folds: int = 5, labels: list[str] | None = None):
    """What `load_teachers` reads of a student's data module."""
    return SimpleNamespace(
        hparams={"fold": fold, "num_folds": num_folds},
        labels=list(labels or LABELS),
        sample_rate=16000,
        clip_samples=16000,
    )


def with_fold(source: Path, target: Path, fold: int | None, num_folds: int) -> Path:
    """A copy of checkpoint `source` whose stored config says it was trained on `fold` of `num_folds`."""
    checkpoint = load_checkpoint(source)
    checkpoint["hyper_parameters"]["config"]["data"].update(fold=fold, num_folds=num_folds)
    torch.save(checkpoint, target)
    return target


# ---- the loss ---------------------------------------------------------------------------------------------


def test_distillation_loss_equals_a_hand_computation():
    student = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
    teachers = [[[1.0, 1.0, 0.0], [0.5, -0.5, 2.0]], [[3.0, 0.0, -2.0], [0.0, 0.0, 0.0]]]
    hard_targets, temperature, alpha, smoothing = [0, 2], 2.0, 0.7, 0.1

    def softmax(row: list[float], t: float) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    # Teacher distribution: each teacher's softmax(logits / T), averaged per clip.
    p = [
        [
            (a + b) / 2
            for a, b in zip(
                softmax(teachers[0][i], temperature), softmax(teachers[1][i], temperature), strict=True
            )
        ]
        for i in range(2)
    ]
    q = [softmax(row, temperature) for row in student]
    kl = sum(p[i][c] * math.log(p[i][c] / q[i][c]) for i in range(2) for c in range(3)) / 2
    soft_by_hand = temperature**2 * kl
    # Label-smoothed cross-entropy (the hard loss as configured), by hand.
    hard_by_hand = 0.0
    for i, target in enumerate(hard_targets):
        log_q1 = [math.log(v) for v in softmax(student[i], 1.0)]
        smoothed = [smoothing / 3 + (1 - smoothing) * (c == target) for c in range(3)]
        hard_by_hand -= sum(s * lq for s, lq in zip(smoothed, log_q1, strict=True)) / 2

    logits = torch.tensor(student)
    teacher_probs = torch.stack([torch.softmax(torch.tensor(t) / temperature, -1) for t in teachers]).mean(0)
    soft = distillation_loss(logits, teacher_probs, temperature)
    hard = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, torch.tensor(hard_targets))
    assert soft.item() == pytest.approx(soft_by_hand, rel=1e-5)
    assert hard.item() == pytest.approx(hard_by_hand, rel=1e-5)
    total = combine_losses(hard, soft, alpha)
    assert total.item() == pytest.approx((1 - alpha) * hard_by_hand + alpha * soft_by_hand, rel=1e-5)
    # A student equal to its teachers' distribution has no soft loss.
    assert distillation_loss(teacher_probs.log() * temperature, teacher_probs, temperature).item() == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_alpha_zero_gives_the_plain_loss_exactly(tiny_checkpoint):
    predictor = Predictor.from_checkpoints([tiny_checkpoint["ckpt"]], device="cpu")
    teachers = Teachers(predictor, alpha=0.0, temperature=3.0)
    waves = torch.rand(4, 16000, generator=torch.Generator().manual_seed(0)) - 0.5
    logits = torch.randn(4, len(LABELS), requires_grad=True)
    hard = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    total, soft = teachers.loss(waves, logits, hard)
    assert torch.equal(total, hard) and soft.item() > 0
    # With alpha > 0 the gradient reaches the student (the teachers' posteriors are not inference tensors).
    total, _ = Teachers(predictor, alpha=0.5, temperature=3.0).loss(waves, logits, hard)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_teachers_run_their_own_front_end_frozen_and_average_at_temperature(tiny_checkpoint):
    path = tiny_checkpoint["ckpt"]
    teachers = load_teachers(
        {"teachers": [str(path), str(path)], "alpha": 0.7, "temperature": 2.0}, fake_datamodule()
    )
    assert teachers is not None and teachers.alpha == 0.7 and teachers.paths == [str(path), str(path)]
    model, _ = load_checkpoint_model(path)
    waves = torch.rand(3, 16000, generator=torch.Generator().manual_seed(1)) - 0.5
    with torch.no_grad():
        expected = torch.softmax(model(waves) / 2.0, dim=-1)
    got = teachers.posteriors(waves)
    assert torch.allclose(got, expected, atol=1e-5) and not got.requires_grad
    for teacher in teachers.predictor.models:
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_teacher_with_the_students_front_end_reuses_its_features(tiny_checkpoint):
    teachers = Teachers(Predictor.from_checkpoints([tiny_checkpoint["ckpt"]], device="cpu"), 0.5, 2.0)
    student = KWSLightningModule.from_checkpoint(tiny_checkpoint["ckpt"]).model
    waves = torch.rand(3, 16000, generator=torch.Generator().manual_seed(3)) - 0.5
    own = teachers.posteriors(waves)
    with torch.no_grad():
        features = student.frontend(waves)
    assert same_front_end(teachers.predictor.models[0].frontend, student.frontend)
    assert torch.allclose(teachers.posteriors(waves, features, student.frontend), own, atol=1e-6)
    # The shared features are what the teacher's network runs on (other features, other posteriors) ...
    shifted = teachers.posteriors(waves, features + 1.0, student.frontend)
    assert not torch.allclose(shifted, own, atol=1e-3)
    # ... only when the front ends agree: another setting or filter bank, and the teacher computes its own.
    other = copy.deepcopy(student.frontend)
    first = next(m for m in other.modules() if hasattr(m, "hop_length"))
    first.hop_length += 1
    assert not same_front_end(teachers.predictor.models[0].frontend, other)
    assert torch.allclose(teachers.posteriors(waves, features + 1.0, other), own, atol=1e-6)
    other = copy.deepcopy(student.frontend)
    buffer_name, buffer = next((n, b) for n, b in other.named_buffers() if b.numel() > 1)
    buffer.mul_(1.001)
    assert not same_front_end(teachers.predictor.models[0].frontend, other), buffer_name


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer in this unit test
def test_teachers_see_the_mixed_waves_and_stay_out_of_the_student(tiny_checkpoint):
    seen: list[torch.Tensor] = []

    class SpyTeachers(Teachers):
        def posteriors(self, waves, features=None, front_end=None):
            seen.append(waves.clone())
            return super().posteriors(waves, features, front_end)

    predictor = Predictor.from_checkpoints([tiny_checkpoint["ckpt"]], device="cpu")
    student = KWSLightningModule.from_checkpoint(tiny_checkpoint["ckpt"]).model
    module = KWSLightningModule(
        student, LABELS, mixup=Mixup(alpha=0.4, p=1.0), teachers=SpyTeachers(predictor, 0.5, 2.0)
    )
    assert not any("teacher" in key for key in module.state_dict())
    assert len(module.state_dict()) == len(KWSLightningModule(student, LABELS).state_dict())
    waves = torch.rand(6, 16000, generator=torch.Generator().manual_seed(2)) - 0.5
    torch.manual_seed(0)
    import random

    random.seed(0)
    module.training_step((waves, torch.arange(6)), 0)
    random.seed(0)
    torch.manual_seed(0)
    mixed = Mixup(alpha=0.4, p=1.0)(waves, torch.arange(6))
    assert len(seen) == 1 and torch.equal(seen[0], mixed.waves) and not torch.equal(seen[0], waves)


# ---- the teachers' checks ---------------------------------------------------------------------------------


def test_fold_placeholder_is_replaced_by_data_fold():
    assert teacher_paths(["cv/fold_{fold}/last.ckpt", "plain.ckpt"], 3) == [
        "cv/fold_3/last.ckpt",
        "plain.ckpt",
    ]
    with pytest.raises(ValueError, match=r"contains \{fold\} but this run has no data.fold"):
        teacher_paths(["cv/fold_{fold}/last.ckpt"], None)
    assert load_teachers({"teachers": []}, fake_datamodule()) is None


def test_missing_teacher_file_is_named(tmp_path):
    missing = tmp_path / "fold_2" / "last.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(f"teacher checkpoint {missing} does not exist")):
        load_teachers({"teachers": [str(tmp_path / "fold_{fold}" / "last.ckpt")]}, fake_datamodule(fold=2))


def test_teacher_with_other_labels_is_refused(tiny_checkpoint):
    other = [*LABELS[:2], *reversed(LABELS[2:])]
    with pytest.raises(CheckpointError, match="same classes") as error:
        load_teachers({"teachers": [str(tiny_checkpoint["ckpt"])]}, fake_datamodule(labels=other))
    assert str(tiny_checkpoint["ckpt"]) in str(error.value)


def test_cv_student_refuses_a_teacher_from_another_fold(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint["ckpt"]
    fold_1 = with_fold(source, tmp_path / "fold_1.ckpt", 1, 5)
    k3 = with_fold(source, tmp_path / "k3.ckpt", 0, 3)
    same = with_fold(source, tmp_path / "fold_0.ckpt", 0, 5)
    student_fold_0 = fake_datamodule(fold=0, num_folds=5)
    for teacher, trained in (
        (source, "without folds"),
        (fold_1, "with data.fold=1 data.num_folds=5"),
        (k3, "with data.fold=0 data.num_folds=3"),
    ):
        with pytest.raises(CheckpointError, match="held-out speakers") as error:
            load_teachers({"teachers": [str(same), str(teacher)]}, student_fold_0)
        assert f"teacher {teacher} was trained {trained}" in str(error.value)
    assert load_teachers({"teachers": [str(tmp_path / "fold_{fold}.ckpt")]}, student_fold_0) is not None
    # A student outside CV may learn from any teacher on its classes.
    assert load_teachers({"teachers": [str(fold_1)]}, fake_datamodule()) is not None


# ---- a distilled training run -----------------------------------------------------------------------------

STUDENT = [
    "experiment=quickstart",
    "feature=logmel",  # the teacher uses MFCC: each model runs its own front end
    "model.n_feature_maps=8",
    "data.batch_size=32",
    "scheduler.warmup_steps=1",
    "trainer.max_epochs=3",  # max_steps ends the runs; one epoch would be over when resumed
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
    "test=false",
    "distill.alpha=0.7",
    "distill.temperature=2.0",
]


def test_distilled_training_resumes_and_its_student_works_without_the_teacher(
    tiny_checkpoint, synthetic_overrides, run_cli, tmp_path
):
    from kws_lightning.export import export_checkpoint, load_exported

    teacher = tmp_path / "teachers" / "fold_x.ckpt"
    teacher.parent.mkdir()
    shutil.copy(tiny_checkpoint["ckpt"], teacher)
    run_dir = tmp_path / "run"
    args = [
        *synthetic_overrides,
        *STUDENT,
        f"hydra.run.dir={run_dir}",
        f"distill.teachers=[{teacher},{teacher}]",
    ]
    env = {"OMP_NUM_THREADS": "1"}
    check_ok(run_cli("train", *args, "trainer.max_steps=2", cwd=tmp_path, env=env))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2
    # Resumed after a stop: the teachers come from the config again, the student from last.ckpt.
    check_ok(run_cli("train", *args, "trainer.max_steps=4", "ckpt_path=auto", cwd=tmp_path, env=env))
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 4
    metrics = pd.concat(pd.read_csv(p) for p in run_dir.rglob("metrics.csv"))
    soft = metrics["train/loss_distill"].dropna()
    assert len(soft) >= 2 and (soft > 0).all()  # logged by both runs

    # The student's checkpoint is the student: no teacher weights, strictly loadable into the plain module.
    state = checkpoint["state_dict"]
    assert not any("teacher" in key for key in state)
    student = KWSLightningModule.from_checkpoint(last)  # load_state_dict is strict: an extra key fails
    assert set(state) == set(student.state_dict())
    assert checkpoint["hyper_parameters"]["config"]["distill"]["teachers"] == [str(teacher), str(teacher)]

    shutil.rmtree(teacher.parent)  # predict / export of the student never open the teacher files
    clips = [np.random.default_rng(0).integers(-3000, 3000, 16000, dtype=np.int16)]
    probs = Predictor.from_checkpoints([last], device="cpu").predict_arrays(clips)
    assert probs.shape == (1, len(LABELS)) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    exported = export_checkpoint(str(last), "torchscript", tmp_path / "student.pt")
    assert Path(exported["path"]).is_file()
    assert load_exported(tmp_path / "student.pt", "torchscript") is not None


def test_cli_names_a_missing_teacher(synthetic_overrides, run_cli, tmp_path):
    missing = tmp_path / "nowhere" / "fold_0" / "last.ckpt"
    result = run_cli(
        "train",
        *synthetic_overrides,
        *STUDENT,
        "trainer.max_steps=1",
        "data.fold=0",
        "data.num_folds=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        # Quoted as on a shell command line: Hydra's grammar reads an unquoted {...} as a dict.
        f'distill.teachers=["{tmp_path / "nowhere" / "fold_{fold}" / "last.ckpt"}"]',
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert f"teacher checkpoint {missing} does not exist" in result.stderr
