"""Knowledge distillation (issue 16): frozen teacher checkpoints whose averaged, temperature-softened
posteriors a student learns beside its hard labels; only the student is trained, saved and shipped.

loss = (1 - alpha) * hard loss (as configured: cross-entropy, label smoothing, mixup)
       + alpha * T^2 * KL(teacher || student), at temperature T,
the teacher distribution being the mean of each teacher's softmax(logits / T) (Hinton et al. 2015; the
T^2 keeps the soft term's gradients on the hard term's scale whatever T is).

Teachers are loaded as `inference.Predictor` loads an ensemble (opened as data, weights_only=True, rebuilt
through the registries, each with its own front end and feature normalisation) and run on the student's
training waves, after the on-device augmentation and mixup, before SpecAugment (the student's only); a
teacher whose front end computes exactly the student's features runs its network on those (one front end
pass instead of one per teacher: two TC-ResNet teachers cost 1.4x a plain step instead of 2.1x). They
are held outside the LightningModule's submodules, so checkpoints, EMA / SWA copies and exports never
contain them, and a resumed run reloads them from `distill.teachers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kws_lightning.checkpoints import CheckpointError
from kws_lightning.inference import Predictor, run_model

FOLD_PLACEHOLDER = "{fold}"


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 KL(teacher || student) at temperature T, averaged over the batch. `teacher_probs` (B, C) are
    already softened at T (rows summing to 1)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, teacher_probs.float(), reduction="batchmean")


def combine_losses(hard: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * hard + alpha * soft; alpha = 0 is the hard loss exactly (the soft term dropped)."""
    if alpha == 0.0:
        return hard
    return (1.0 - alpha) * hard + alpha * soft


def teacher_paths(patterns: Sequence[str], fold: int | None) -> list[str]:
    """`distill.teachers` with `{fold}` replaced by the run's data.fold (a cv command: per-fold teachers)."""
    paths = []
    for pattern in patterns:
        pattern = str(pattern)
        if FOLD_PLACEHOLDER in pattern:
            if fold is None:
                raise ValueError(
                    f"distill.teachers entry {pattern!r} contains {FOLD_PLACEHOLDER} but this run has no "
                    "data.fold: set data.fold=i data.num_folds=k (or run it through kws_lightning.cv), or "
                    "give the teacher's path without the placeholder"
                )
            pattern = pattern.replace(FOLD_PLACEHOLDER, str(int(fold)))
        paths.append(pattern)
    return paths


@dataclass
class Teachers:
    """The teacher ensemble and the distillation settings; `loss` adds the soft term to a hard loss."""

    predictor: Predictor
    alpha: float
    temperature: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1] (the soft loss's weight), got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature!r}")
        for model in self.predictor.models:
            model.eval().requires_grad_(False)

    @property
    def paths(self) -> list[str]:
        return list(self.predictor.paths)

    def posteriors(
        self,
        waves: torch.Tensor,
        features: torch.Tensor | None = None,
        front_end: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The teachers' mean softmax(logits / T) for float waves (B, N), on the waves' device. `features`:
        the student's front end output for `waves` (before SpecAugment), computed by `front_end`; a teacher
        whose front end computes exactly the same (`same_front_end`) runs its network on them instead of
        recomputing them (the front end is ~3/4 of a TC-ResNet teacher's time)."""
        if self.predictor.device != waves.device:
            for model in self.predictor.models:
                model.to(waves.device)
        temperature = self.temperature
        with torch.inference_mode():
            waves = waves.detach().float()
            total = torch.zeros(())
            for model in self.predictor.models:
                own = getattr(model, "frontend", None)
                shared = features is not None and front_end is not None and own is not None
                shared = shared and same_front_end(own, front_end)
                logits = run_model(model, waves, features.detach() if shared else None)
                total = total + torch.softmax(logits.float() / temperature, dim=-1)
            probs = total / len(self.predictor.models)
        # Computed under inference_mode; the clone is an ordinary tensor autograd may keep for backward.
        return probs.clone()

    def loss(
        self,
        waves: torch.Tensor,
        student_logits: torch.Tensor,
        hard_loss: torch.Tensor,
        features: torch.Tensor | None = None,
        front_end: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, soft loss) for the student's logits on `waves` (what the student saw; `features`
        and `front_end` as for `posteriors`)."""
        teacher_probs = self.posteriors(waves, features, front_end)
        soft = distillation_loss(student_logits, teacher_probs, self.temperature)
        return combine_losses(hard_loss, soft, self.alpha), soft


def same_front_end(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two front ends compute the same features: the same classes and settings in every submodule,
    and equal buffers and parameters (filter banks, windows, normalisation statistics)."""
    if a is b:
        return True
    modules_a, modules_b = list(a.modules()), list(b.modules())
    if len(modules_a) != len(modules_b):
        return False
    for x, y in zip(modules_a, modules_b, strict=True):
        if type(x) is not type(y) or _settings(x) != _settings(y):
            return False
        tensors_x = {**dict(x.named_buffers(recurse=False)), **dict(x.named_parameters(recurse=False))}
        tensors_y = {**dict(y.named_buffers(recurse=False)), **dict(y.named_parameters(recurse=False))}
        if tensors_x.keys() != tensors_y.keys():
            return False
        for name, tensor in tensors_x.items():
            other = tensors_y[name]
            if tensor.shape != other.shape or not torch.equal(tensor.detach().cpu(), other.detach().cpu()):
                return False
    return True


def _settings(module: torch.nn.Module) -> dict[str, Any]:
    """A module's plain settings (n_fft, pad_mode, normalisation mode, ...), not its training flag."""
    return {
        key: value
        for key, value in vars(module).items()
        if isinstance(value, bool | int | float | str) and key != "training"
    }


def load_teachers(settings: Mapping[str, Any] | None, datamodule: Any) -> Teachers | None:
    """The teachers `distill` (teachers, alpha, temperature) names for a student trained on `datamodule`,
    loaded on the CPU (moved to the batch's device on first use); None when distillation is off.

    Refused with the file and the fix: a missing or unreadable file, other classes or input format than the
    student's, and, for a cross-validation fold, a teacher trained on another fold split (it saw this fold's
    held-out speakers).
    """
    settings = dict(settings or {})
    patterns = list(settings.get("teachers") or [])
    if not patterns:
        return None
    hparams = datamodule.hparams
    fold, num_folds = hparams.get("fold"), hparams.get("num_folds")
    paths = teacher_paths(patterns, fold)
    for path in paths:
        if not _is_file(path):
            raise CheckpointError(
                f"distill.teachers: teacher checkpoint {path} does not exist: fix the path in "
                "distill.teachers (a {fold} in it is replaced by data.fold) or train that teacher first"
            )
    try:
        predictor = Predictor.from_checkpoints(paths, device="cpu")
    except CheckpointError as error:
        raise CheckpointError(f"distill.teachers: {error}") from None
    student = {
        "labels": list(datamodule.labels),
        "sample_rate": int(datamodule.sample_rate),
        "clip_samples": int(datamodule.clip_samples),
    }
    teacher = {
        "labels": predictor.labels,
        "sample_rate": predictor.sample_rate,
        "clip_samples": predictor.clip_samples,
    }
    for key, value in student.items():
        if teacher[key] != value:
            raise CheckpointError(
                f"distill.teachers: teacher {paths[0]} has {key} {teacher[key]}, the student {value}: a "
                "teacher must be trained on the same classes (data.keywords, in the same order) and input "
                "format as the student; use such a teacher or change the student's data settings"
            )
    if fold is not None:
        for path, config in zip(paths, predictor.configs, strict=True):
            _check_same_fold(path, config, int(fold), int(num_folds))
    return Teachers(predictor, float(settings.get("alpha", 0.5)), float(settings.get("temperature", 1.0)))


def _check_same_fold(path: str, config: Mapping[str, Any], fold: int, num_folds: int) -> None:
    data = config.get("data") or {}
    got = (data.get("fold"), data.get("num_folds") if data.get("fold") is not None else None)
    if got != (fold, num_folds):
        trained = "without folds" if got[0] is None else f"with data.fold={got[0]} data.num_folds={got[1]}"
        raise CheckpointError(
            f"distill.teachers: teacher {path} was trained {trained}, but this student is data.fold={fold} "
            f"of data.num_folds={num_folds}: that teacher saw this fold's held-out speakers, so the "
            "student's held-out score would leak. Use the teacher trained on the same fold, e.g. "
            "distill.teachers=[.../fold_{fold}/checkpoints/last.ckpt] (the placeholder becomes data.fold)"
        )


def _is_file(path: str) -> bool:
    return Path(path).expanduser().is_file()
