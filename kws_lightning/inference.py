"""Checkpoint -> predictor: posteriors for batches of waves, int16 clips of any length, or audio files.

One `Predictor` holds one model or an ensemble (posteriors averaged), the class names and the input
format (sample rate, clip length) read from the checkpoints' hyper-parameters, so eval, predict, listen
and export all rebuild the model the same way: the checkpoint opened as data and the model built from its
stored config through the registries (`kws_lightning.checkpoints`), as training assembled it.

Clips of any length go through the evaluation input path of training (`augment.window` with
`augment.center_starts`: centred pad / crop, int16 / 32768), so a clip scores the same here as in
`trainer.test`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kws_lightning.checkpoints import CheckpointError, build_checkpoint_model, load_checkpoint
from kws_lightning.data.audio_io import AudioReadError, decode_audio
from kws_lightning.data.augment import INT16_SCALE, center_starts, window
from kws_lightning.data.dataset import keep_batch

log = logging.getLogger(__name__)
MODEL_PREFIX = "model."  # KWSLightningModule keeps the KWSModel as `self.model`


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation: the clip as is, time-shifted by ±`shift_ms`, and at each gain in `gains_db`."""

    shift_ms: float = 100.0
    gains_db: tuple[float, ...] = (-6.0, 6.0)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TTAConfig:
        values = dict(values or {})
        unknown = sorted(set(values) - {"shift_ms", "gains_db"})
        if unknown:
            raise ValueError(f"tta options {unknown} unknown; valid: shift_ms, gains_db")
        return cls(
            shift_ms=float(values.get("shift_ms", cls.shift_ms)),
            gains_db=tuple(float(g) for g in values.get("gains_db", cls.gains_db)),
        )


def checkpoint_paths(value: Any) -> list[str]:
    """A `ckpt_path` setting as a list: one path, or a list of them (an ensemble)."""
    if value is None or value == "":
        raise CheckpointError(
            "ckpt_path is required: ckpt_path=logs/<task>/runs/<stamp>/checkpoints/<name>.ckpt"
        )
    if isinstance(value, str | Path):
        return [str(value)]
    return [str(v) for v in value]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` = the GPU when there is one, else the CPU; anything else as torch spells it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_checkpoint_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's `KWSModel` (eval mode, on `device`) and its hyper-parameters.

    The checkpoint is opened as data (`kws_lightning.checkpoints.load_checkpoint`), the model rebuilt
    from ``hyper_parameters.config.feature`` / ``.model`` through the registries
    (`build_checkpoint_model`), then the ``model.*`` weights are loaded (strictly).
    """
    checkpoint = load_checkpoint(path)
    model, hparams = build_checkpoint_model(checkpoint, path)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{path} has no state_dict: it was not written by `python -m kws_lightning.train`"
        )
    weights = {
        key[len(MODEL_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(MODEL_PREFIX)
    }
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config describes: {error}"
        ) from None
    return model.to(resolve_device(device)).eval(), hparams


def run_model(model: nn.Module, waves: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of `model` for float waves (B, N), or for `features` its own front end would compute from
    them (a `KWSModel` only; distillation shares one front end pass). A `KWSModel` on the CPU runs its
    network on channels-last features (its weights converted once, on first use): oneDNN's convolutions
    and pooling then skip a layout reorder per call. Measured (benchmarks/README.md, Profiles; one thread,
    batch 64): cnn_trad_pool2 1.5x, ds_cnn 2.5x, light_cnn 1.9x, res8 1.4x, TC-ResNet / MatchboxNet /
    BC-ResNet equal or slightly faster; the logits agree to float32 rounding (< 1e-6)."""
    net, frontend = getattr(model, "net", None), getattr(model, "frontend", None)
    if net is None or frontend is None:
        return model(waves)
    if waves.device.type != "cpu":
        return model(waves) if features is None else net(features)
    if not getattr(model, "_channels_last", False):
        net.to(memory_format=torch.channels_last)
        model._channels_last = True
    if features is None:
        features = frontend(waves)
    if features.dim() == 4:
        features = features.contiguous(memory_format=torch.channels_last)
    return net(features)


@dataclass
class Predictor:
    """One model or an ensemble sharing class names and input format; posteriors are averaged."""

    models: list[nn.Module]
    labels: list[str]
    sample_rate: int
    clip_samples: int
    configs: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @classmethod
    def from_checkpoints(
        cls, paths: str | Path | Sequence[str | Path], device: str | torch.device = "auto"
    ) -> Predictor:
        """Load one checkpoint or several (an ensemble); all must name the same classes in the same order."""
        paths = [paths] if isinstance(paths, str | Path) else list(paths)
        if not paths:
            raise CheckpointError("no checkpoint given: pass ckpt_path=PATH or ckpt_path=[PATH1,PATH2]")
        models, hparams = zip(*(load_checkpoint_model(p, device) for p in paths), strict=True)
        first = hparams[0]
        for path, other in zip(paths[1:], hparams[1:], strict=True):
            for key in ("labels", "sample_rate", "clip_samples"):
                if other[key] != first[key]:
                    raise CheckpointError(
                        f"ensemble checkpoints disagree on {key}: {paths[0]} has {first[key]}, {path} has "
                        f"{other[key]}. Only models trained on the same classes and input can be averaged."
                    )
        return cls(
            list(models),
            list(first["labels"]),
            int(first["sample_rate"]),
            int(first["clip_samples"]),
            [dict(h["config"]) for h in hparams],
            [str(p) for p in paths],
        )

    @classmethod
    def from_exported(
        cls, path: str | Path, threads: int | None = None, trust_code: bool = False
    ) -> Predictor:
        """An exported model (.onnx, int8 or float, or TorchScript .pt from `kws_lightning.export`), with
        the class names, input format and data config its metadata carries. A TorchScript file is code
        (loading it runs what it holds): refused unless `trust_code`."""
        from kws_lightning.export import FORMATS, ExportedRunner

        if Path(path).suffix == FORMATS["torchscript"] and not trust_code:
            raise CheckpointError(
                f"model_path={path} is TorchScript, a program rather than data: loading it runs the code it "
                "holds, which may read or write any file. Load it only if you exported it yourself: add "
                "trust_code=true; or use an ONNX export (format=onnx), which is read as data"
            )
        runner = ExportedRunner(path, threads)
        meta = runner.metadata
        config = {"data": meta["data"]} if meta.get("data") else {}
        return cls(
            [runner],
            list(meta["labels"]),
            int(meta["sample_rate"]),
            int(meta["clip_samples"]),
            [config],
            [str(path)],
        )

    @classmethod
    def from_config(
        cls, ckpt_path: Any, model_path: Any = None, device: str = "auto", trust_code: bool = False
    ) -> Predictor:
        """`ckpt_path=` (one checkpoint or a list) or `model_path=` (an exported model; a TorchScript one
        only with `trust_code`), from a command's settings; exactly one of them."""
        if model_path:
            if ckpt_path not in (None, "", "???"):
                raise CheckpointError("give ckpt_path or model_path, not both")
            return cls.from_exported(str(model_path), trust_code=trust_code)
        if ckpt_path in (None, "", "???"):
            raise CheckpointError(
                "ckpt_path (a checkpoint from kws_lightning.train) or model_path (an exported .onnx / .pt) "
                "is required"
            )
        return cls.from_checkpoints(checkpoint_paths(ckpt_path), device)

    @property
    def device(self) -> torch.device:
        # An exported model (ExportedRunner) has no parameters: it runs on the CPU.
        parameter = next(self.models[0].parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def keywords(self) -> list[str]:
        return self.labels[2:]

    @torch.inference_mode()
    def posteriors(self, waves: torch.Tensor) -> torch.Tensor:
        """Float waves (B, clip_samples) in [-1, 1] -> posteriors (B, classes), averaged over the ensemble."""
        waves = waves.to(self.device, torch.float32)
        total = torch.softmax(run_model(self.models[0], waves), dim=-1)
        for model in self.models[1:]:
            total += torch.softmax(run_model(model, waves), dim=-1)
        return total / len(self.models)

    def views(self, waves: torch.Tensor, lengths: torch.Tensor, tta: TTAConfig | None = None) -> torch.Tensor:
        """int16 clips (B, L) left-aligned with their `lengths` -> float model inputs (V, B, clip_samples).

        V = 1 (centred, as at training-time evaluation) or, with `tta`, also the clip shifted later and
        earlier by `tta.shift_ms` (its own audio, not a wrap-around, fills in) and the centred clip at
        each gain of `tta.gains_db` (clipped to [-1, 1]).
        """
        starts = center_starts(lengths, self.clip_samples)
        centred = window(waves, starts, self.clip_samples).float() / INT16_SCALE
        if tta is None:
            return centred[None]
        shift = int(round(tta.shift_ms * self.sample_rate / 1000.0))
        out = [centred]
        for delta in (-shift, shift):  # window start earlier = content later in the window
            out.append(window(waves, starts + delta, self.clip_samples).float() / INT16_SCALE)
        for gain_db in tta.gains_db:
            out.append((centred * 10.0 ** (gain_db / 20.0)).clamp(-1.0, 1.0))
        return torch.stack(out)

    def posteriors_int16(
        self, waves: torch.Tensor, lengths: torch.Tensor, tta: TTAConfig | None = None
    ) -> torch.Tensor:
        """Posteriors (B, classes) of int16 clips (B, L) of the given lengths; TTA views are averaged."""
        views = self.views(waves.to(self.device), lengths.to(self.device), tta)
        num_views, batch = views.shape[:2]
        probs = self.posteriors(views.reshape(num_views * batch, -1))
        return probs.reshape(num_views, batch, -1).mean(dim=0)

    def predict_arrays(
        self, clips: Sequence[np.ndarray], batch_size: int = 256, tta: TTAConfig | None = None
    ) -> np.ndarray:
        """Posteriors (N, classes) for clips at `sample_rate`: int16, or float in [-1, 1], any length."""
        out = np.zeros((len(clips), len(self.labels)), np.float32)
        for first in range(0, len(clips), batch_size):
            chunk = [_as_int16(c) for c in clips[first : first + batch_size]]
            lengths = np.array([len(c) for c in chunk], np.int64)
            waves = np.zeros((len(chunk), max(int(lengths.max()), 1)), np.int16)
            for row, clip in enumerate(chunk):
                waves[row, : len(clip)] = clip
            probs = self.posteriors_int16(torch.from_numpy(waves), torch.from_numpy(lengths), tta)
            out[first : first + len(chunk)] = probs.cpu().numpy()
        return out

    def predict_files(
        self,
        paths: Sequence[str],
        batch_size: int = 256,
        num_workers: int = 0,
        tta: TTAConfig | None = None,
        progress: bool = False,
        max_samples: int | None = None,
        repaired: dict[int, str] | None = None,
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Posteriors (N, classes) for audio files, and {row: reason} for files that could not be read
        (their rows are NaN). Decoding runs in `num_workers` DataLoader workers, a batch per task.
        Files longer than `max_samples` are cropped to their centre; `repaired` collects {row: note}."""
        probs = np.full((len(paths), len(self.labels)), np.nan, np.float32)
        errors: dict[int, str] = {}
        batches = iterate_file_batches(
            paths, self.sample_rate, batch_size, num_workers, progress, max_samples
        )
        for batch in batches:
            errors.update(batch["errors"])
            if repaired is not None:
                repaired.update(batch["notes"])
            ok = batch["lengths"] > 0
            if ok.any():
                rows = batch["index"][ok].numpy()
                probs[rows] = (
                    self.posteriors_int16(batch["waves"][ok], batch["lengths"][ok], tta).cpu().numpy()
                )
        return probs, errors


def _as_int16(clip: np.ndarray) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.ndim != 1:
        raise ValueError(f"a clip must be 1-D mono samples, got shape {clip.shape}")
    if clip.dtype == np.int16:
        return clip
    if np.issubdtype(clip.dtype, np.floating):
        return np.clip(np.rint(clip * INT16_SCALE), -32768, 32767).astype(np.int16)
    raise ValueError(f"clips must be int16 or float in [-1, 1], got dtype {clip.dtype}")


class AudioFiles(Dataset):
    """Audio files decoded a whole batch per call (`__getitems__`): what a DataLoader worker does.

    A batch is ``waves`` int16 (B, L) left-aligned and zero-padded, ``lengths`` (0 for a file that could
    not be read), ``index`` (rows into `paths`), ``errors`` {index: reason} and ``notes`` {index: what
    was repaired} (files longer than `max_samples`, cropped to their centre).
    """

    def __init__(
        self, paths: Sequence[str], sample_rate: int = 16000, max_samples: int | None = None
    ) -> None:
        self.paths = list(paths)
        self.sample_rate = sample_rate
        self.max_samples = max_samples

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.__getitems__([item])

    def __getitems__(self, items: list[int]) -> dict[str, Any]:
        clips, errors, notes = [], {}, {}
        for item in items:
            try:
                decoded = decode_audio(self.paths[item], self.sample_rate, self.max_samples)
            except AudioReadError as error:
                errors[item] = error.reason
                clips.append(np.zeros(0, np.int16))
                continue
            clips.append(decoded.samples)
            if decoded.note:
                notes[item] = decoded.note
        lengths = np.array([len(c) for c in clips], np.int64)
        waves = np.zeros((len(clips), max(int(lengths.max(initial=0)), 1)), np.int16)
        for row, clip in enumerate(clips):
            waves[row, : len(clip)] = clip
        return {
            "waves": torch.from_numpy(waves),
            "lengths": torch.from_numpy(lengths),
            "index": torch.as_tensor(items, dtype=torch.long),
            "errors": errors,
            "notes": notes,
        }


def iterate_file_batches(
    paths: Sequence[str],
    sample_rate: int,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = False,
    max_samples: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches of decoded files in order (see `AudioFiles`), with a tqdm bar over clips when `progress`."""
    loader = DataLoader(
        AudioFiles(paths, sample_rate, max_samples),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=keep_batch,
        num_workers=num_workers,
        # Workers decode ahead while the main process runs the model.
        prefetch_factor=4 if num_workers > 0 else None,
    )
    if not progress:
        yield from loader
        return
    from tqdm import tqdm

    with tqdm(total=len(paths), unit="clip", smoothing=0.1, dynamic_ncols=True) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["index"]))
