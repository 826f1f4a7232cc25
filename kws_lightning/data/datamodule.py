"""The LightningDataModule: folder → clip table → decoded waves → TF-style batches → device augmentation."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from kws_lightning.data.audio_io import AudioReadError, read_audio_int16
from kws_lightning.data.augment import (
    AugmentConfig,
    NoiseBank,
    cut_keyword_halves,
    prepare_batch,
    synthesize_silence,
)
from kws_lightning.data.dataset import ClipBatches, ClipIds, DeviceClipBatches, keep_batch
from kws_lightning.data.index import (
    DataLayoutError,
    IndexedDataset,
    add_extra_training_roots,
    index_training_layout,
)
from kws_lightning.data.issues import hydra_run_dir, report_issues
from kws_lightning.data.sampler import SILENCE_ITEM, TFStyleSampler, fixed_selection
from kws_lightning.data.wave_cache import (
    DEFAULT_MAX_CLIP_S,
    WaveCache,
    check_cache_settings,
    load_or_build,
)
from kws_lightning.labels import DEFAULT_KEYWORDS, UNKNOWN, UNKNOWN_INDEX, make_labels

log = logging.getLogger(__name__)


# auto puts the wave cache on a CUDA device when it takes at most this share of the free memory.
CACHE_DEVICE_SHARE = 0.25


class ResumableLoader(DataLoader):
    """A training DataLoader Lightning can resume mid-epoch (it has `state_dict` / `load_state_dict`).

    The batch count comes from the restored fit loop (`batches_done`), not from counting here: Lightning
    prefetches a batch ahead, so the loader's own count would be one too many.
    """

    batches_done: Any = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_pending = True

    def __iter__(self) -> Any:
        if getattr(self, "_resume_pending", False) and self.batches_done is not None:
            self._resume_pending = False
            self.sampler.skip_next = self.batches_done() * self.batch_size
        return super().__iter__()


class SpeechCommandsDataModule(pl.LightningDataModule):
    """Speech Commands (or any folder in its layout, or generated synthetic speech) for training.

    Batches leave the DataLoader as int16 clips; `on_after_batch_transfer` turns them, on the device,
    into ``(waves float32 (B, clip_samples) in [-1, 1], targets int64 (B,))``.

    Bad clips: unreadable or refused files are skipped, clips longer than `max_clip_s` (None: never)
    cropped to their centre; both are logged in one line each and listed in ``data_issues.csv`` in
    `report_dir` (None: the Hydra run dir when there is one). `cache_dir` None decodes in memory only;
    `verify_cache` and `keep_caches` are described in `kws_lightning.data.wave_cache`.

    `fold` (0..num_folds-1; None: the folder's own split) selects a speaker-disjoint cross-validation
    fold (`kws_lightning.data.index.assign_cv_fold`): held out as the test split, the test list dropped.

    `extra_training_roots`: more folders in the training layout (e.g. synthetic speech) whose clips all join
    the training split only; the validation / test draws stay exactly as without them.
    """

    def __init__(
        self,
        root: str | None = None,
        keywords: Sequence[str] = DEFAULT_KEYWORDS,
        batch_size: int = 128,
        num_workers: int = 0,
        silence_percentage: float = 10.0,
        unknown_percentage: float = 10.0,
        validation_percentage: float = 10.0,
        testing_percentage: float = 10.0,
        split_files: Mapping[str, str] | None = None,
        cache_dir: str | None = None,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        synthetic: Mapping[str, Any] | None = None,
        sample_rate: int = 16000,
        clip_duration_s: float = 1.0,
        decode_threads: int = 2,
        balance_keywords: bool = False,
        max_clip_s: float | None = DEFAULT_MAX_CLIP_S,
        verify_cache: Literal["full", "quick", "off"] = "quick",
        keep_caches: int | None = 4,
        report_dir: str | None = None,
        dataset: Literal["v0.01", "v0.02"] | None = None,
        download: bool = False,
        fold: int | None = None,
        num_folds: int = 5,
        extra_training_roots: Sequence[str] = (),
        cache_on_device: Literal["auto", "true", "false"] | bool = "auto",
    ) -> None:
        super().__init__()
        if str(cache_on_device).lower() not in ("auto", "true", "false"):
            raise ValueError(f"data.cache_on_device={cache_on_device!r}: use auto, true or false")
        if root is None and synthetic is None:
            raise ValueError("no data: set data.root=PATH to a Speech Commands folder, or use data=synthetic")
        if download and (dataset is None or root is None):
            raise ValueError(
                "data.download=true needs data.dataset (v0.01 or v0.02) and data.root: use "
                "data=speech_commands_v1 or data=speech_commands_v2, which set both"
            )
        if root is None and cache_dir is None:
            raise ValueError("data=synthetic needs data.cache_dir (the speech is generated there)")
        if max_clip_s is not None and max_clip_s < clip_duration_s:
            raise ValueError(
                f"data.max_clip_s={max_clip_s} is shorter than data.clip_duration_s={clip_duration_s}: "
                "raise it (or null: never crop)"
            )
        check_cache_settings(verify_cache, keep_caches)
        # Absolute paths: checkpoints record them, and eval / predict may run from another directory.
        # No cache_dir: decode in memory, never into wherever the command was launched.
        root = None if root is None else str(Path(root).expanduser().resolve())
        cache_dir = None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())
        if isinstance(extra_training_roots, str):
            raise ValueError(
                f"data.extra_training_roots={extra_training_roots!r} is one string: give a list, "
                f"data.extra_training_roots=[{extra_training_roots}]"
            )
        extra_training_roots = [str(Path(p).expanduser().resolve()) for p in extra_training_roots or ()]
        self.save_hyperparameters(logger=False)
        self.keywords = list(keywords)
        self.labels = make_labels(self.keywords)
        self.num_classes = len(self.labels)
        self.sample_rate = sample_rate
        self.clip_samples = int(round(sample_rate * clip_duration_s))
        self.augment = AugmentConfig.from_mapping(augment)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.dataset: IndexedDataset | None = None
        self.cache: WaveCache | None = None
        self._prepared: tuple[IndexedDataset, WaveCache] | None = None  # prepare_data's result, for setup
        self.noise = NoiseBank([], self.clip_samples)
        self.train_sampler: TFStyleSampler | None = None
        self.eval_items: dict[str, np.ndarray] = {}
        self.eval_silence: dict[str, np.ndarray] = {}
        self._device_batches: dict[str, DeviceClipBatches] = {}  # device: the cache held there
        self._device_silence: dict[str, torch.Tensor] = {}

    # ---- preparation -------------------------------------------------------------------------
    def resolve_root(self) -> Path:
        """The data folder; synthetic speech is generated on first use into the cache directory."""
        if self.hparams.root is not None:
            return Path(self.hparams.root).expanduser()
        from kws_lightning.data.synthetic import ensure_synthetic_dataset

        return Path(ensure_synthetic_dataset(self.cache_dir, **dict(self.hparams.synthetic)))

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, before the others' setup: the only place that writes
        # synthetic data or the wave cache, so DDP ranks never race on the files and all map the same one.
        # (Kept for this process's setup; the other ranks index again and map the file this one wrote.)
        # The other ranks wait for it at Lightning's barrier (no timeout), so they only ever index a finished
        # download; nodes sharing a file system download once (ensure_dataset locks the folder).
        if self.cache is None:
            self._download_if_asked()
            self._prepared = self._index_and_cache()

    def _download_if_asked(self) -> None:
        """Fetch `dataset` into `root` when `download` and its marker is not there (data/provision.py)."""
        hp = self.hparams
        if hp.root is None or hp.dataset is None:
            return
        if hp.download:
            from kws_lightning.data.archives import resolve_archive
            from kws_lightning.data.provision import ensure_dataset

            ensure_dataset(resolve_archive(hp.dataset), hp.root, accept_unmarked=True)
        elif not Path(hp.root).exists():
            raise DataLayoutError(
                f"data.root {hp.root} does not exist: add data.download=true to fetch Speech Commands "
                f"{hp.dataset} there, or run `python -m kws_lightning.data.download dataset={hp.dataset} "
                f"root={hp.root}` first, or set data.root to a folder you have"
            )

    def _index_and_cache(self, verify: str | None = None) -> tuple[IndexedDataset, WaveCache]:
        hp = self.hparams
        dataset = index_training_layout(
            self.resolve_root(),
            self.keywords,
            hp.validation_percentage,
            hp.testing_percentage,
            hp.split_files,
            hp.fold,
            hp.num_folds,
        )
        # Appended after the main clips: their row numbers, and so the evaluation draws, do not move.
        dataset = add_extra_training_roots(dataset, hp.extra_training_roots, self.keywords)
        max_samples = None if hp.max_clip_s is None else int(round(hp.max_clip_s * self.sample_rate))
        cache = load_or_build(
            list(dataset.clips["path"]),
            self.cache_dir,
            self.sample_rate,
            hp.decode_threads,
            max_samples,
            verify or hp.verify_cache,
            hp.keep_caches if verify is None else None,
        )
        return dataset, cache

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        hp = self.hparams
        prepared, self._prepared = self._prepared, None
        # Another process on this machine ran prepare_data (Lightning: local rank 0) and checked the cache a
        # moment ago: the others trust it rather than each re-hashing it.
        follower = self.trainer is not None and self.trainer.local_rank > 0
        self.dataset, self.cache = prepared or self._index_and_cache("off" if follower else None)
        if self.trainer is None or self.trainer.global_rank == 0:
            report_issues(self.cache.issues, len(self.cache), hp.report_dir or hydra_run_dir())
        clips = self.dataset.clips
        clips["cache_id"] = np.arange(len(clips))
        clips["ok"] = self.cache.ok
        self.noise = NoiseBank(self._load_noise(), self.clip_samples)
        if not self.noise:
            log.warning(
                "no _background_noise_ recordings under %s: noise mixing off, silence is digital zero",
                self.dataset.root,
            )
        self._check_classes()
        fractions = hp.silence_percentage / 100.0, hp.unknown_percentage / 100.0
        known, unknown = self._known_and_unknown("training")
        self.train_sampler = TFStyleSampler(
            known,
            unknown,
            *fractions,
            seed=hp.seed,
            known_targets=self.clip_targets()[known],
            balance_keywords=hp.balance_keywords,
        )
        for offset, split in enumerate(("validation", "testing")):
            items = fixed_selection(*self._known_and_unknown(split), *fractions, seed=hp.seed + offset)
            silence = items == SILENCE_ITEM
            # Number the fixed silence items so each maps to its own pre-drawn clip.
            items[silence] = -1 - np.arange(silence.sum())
            self.eval_items[split] = items
            self.eval_silence[split] = self._fixed_silence(int(silence.sum()), seed=hp.seed + 1000 + offset)
        log.info("data: %s", self.describe())
        self._warn_shared_speakers()

    def _warn_shared_speakers(self) -> None:
        """Extra training clips by a speaker of the validation or test split make those splits no longer
        speaker-disjoint from training (e.g. a copy of data.root given as an extra folder): say so."""
        clips = self.dataset.clips
        extra = clips["source"] != str(self.dataset.root)
        if not extra.any():
            return
        held_out = set(clips.loc[~extra & (clips["split"] != "training"), "speaker"])
        shared = sorted(held_out & set(clips.loc[extra, "speaker"]))
        if shared:
            log.warning(
                "%d speaker(s) of the validation/test clips also speak in data.extra_training_roots "
                "(first: %s): those splits are no longer speaker-disjoint from training",
                len(shared),
                shared[:3],
            )

    def _load_noise(self) -> list[torch.Tensor]:
        recordings = []
        for path in self.dataset.noise_files:
            try:
                recordings.append(torch.from_numpy(read_audio_int16(path, self.sample_rate)))
            except AudioReadError as error:
                log.warning("skipping background noise: %s", error)
        return recordings

    def _fixed_silence(self, count: int, seed: int) -> np.ndarray:
        """Validation / test silence drawn once from the noise, so every evaluation sees the same clips."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clips = synthesize_silence(count, self.noise.to(torch.device("cpu")), self.augment.silence)
        return (clips * 32767).round().to(torch.int16).numpy()

    def _known_and_unknown(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        clips = self.dataset.clips
        usable = clips[(clips["split"] == split) & clips["ok"]]
        is_unknown = usable["label"] == UNKNOWN
        return usable.loc[~is_unknown, "cache_id"].to_numpy(), usable.loc[is_unknown, "cache_id"].to_numpy()

    def _check_classes(self) -> None:
        clips = self.dataset.clips
        train = clips[(clips["split"] == "training") & clips["ok"]]
        counts = train["label"].value_counts()
        empty = [k for k in self.keywords if counts.get(k, 0) == 0]
        if empty:
            raise ValueError(
                f"keyword(s) {empty} have no usable training clips under {self.dataset.root}: "
                "add clips, or remove them from data.keywords"
            )
        if self.hparams.unknown_percentage > 0 and counts.get(UNKNOWN, 0) == 0:
            raise ValueError(
                f"no unknown-word training clips under {self.dataset.root} (every word folder is a keyword): "
                "add other word folders, or set data.unknown_percentage=0"
            )

    def describe(self) -> str:
        """One line per split: clip counts, and the epoch composition."""
        clips = self.dataset.clips[self.dataset.clips["ok"]]
        parts = [f"root={self.dataset.root} ({self.dataset.split_source} split)"]
        for split in ("training", "validation", "testing"):
            subset = clips[clips["split"] == split]
            parts.append(f"{split}: {len(subset)} clips, {subset['speaker'].nunique()} speakers")
        if self.dataset.extra_roots:
            extra = clips[clips["source"] != str(self.dataset.root)]
            parts.append(
                f"extra training clips: {len(extra)} ({(extra['label'] == UNKNOWN).sum()} unknown) from "
                f"{', '.join(map(str, self.dataset.extra_roots))}"
            )
        parts.append(f"epoch items: {self.train_sampler.epoch_size}")
        return "; ".join(parts)

    def index_hash(self) -> str:
        """sha256 of the clip table (path relative to the root, label, split; sorted by path): equal for
        the same data set wherever it lives, different when a clip, a label or a split changes. A clip of
        the i-th extra training root counts as ``+extra<i>/<rel>``."""
        import hashlib

        clips = self.dataset.clips
        position = {str(root): i for i, root in enumerate(self.dataset.extra_roots)}
        keys = [
            rel if source not in position else f"+extra{position[source]}/{rel}"
            for rel, source in zip(clips["rel"], clips["source"], strict=True)
        ]
        clips = clips.assign(key=keys).sort_values("key")
        digest = hashlib.sha256()
        for row in zip(clips["key"], clips["label"], clips["split"], strict=True):
            digest.update(("\t".join(map(str, row)) + "\n").encode("utf-8"))
        return digest.hexdigest()

    # ---- loaders -----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return torch.device("cpu") if self.trainer is None else self.trainer.strategy.root_device

    def cache_on_device(self, device: torch.device | None = None) -> bool:
        """Whether the loaders yield only ids and the waves are gathered on `device` (the trainer's).
        auto: on CUDA, when the cache takes at most CACHE_DEVICE_SHARE of the free device memory."""
        mode = str(self.hparams.get("cache_on_device", "auto")).lower()
        device = device or self._device()
        if mode != "auto" or device.type != "cuda":
            return mode == "true"
        free, _ = torch.cuda.mem_get_info(device)
        return self.cache.samples.nbytes <= CACHE_DEVICE_SHARE * free

    def _loader(self, dataset: ClipBatches, sampler: Any, loader_class: type = DataLoader) -> DataLoader:
        if self.cache_on_device():
            # Only ids cross the loader; on_after_batch_transfer gathers the waves on the device.
            dataset = ClipIds(dataset.fixed_silence)
        workers = self.hparams.num_workers
        return loader_class(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def clip_targets(self) -> np.ndarray:
        return self.dataset.clips["target"].to_numpy()

    def _world(self) -> tuple[int, int]:
        """(num_replicas, rank) of the attached trainer; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        # Each process draws the same epoch (same seed) and takes its own shard of it; Lightning must not
        # wrap the sampler (conf/trainer: use_distributed_sampler false), or set_epoch would not reach it.
        self.train_sampler.num_replicas, self.train_sampler.rank = self._world()
        self.train_sampler.shard_size = -(-self.train_sampler.epoch_size // self.train_sampler.num_replicas)
        loader = self._loader(
            ClipBatches(self.cache, self.clip_targets()), self.train_sampler, ResumableLoader
        )
        loader.batches_done = self._batches_done_this_epoch
        return loader

    def _batches_done_this_epoch(self) -> int:
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _eval_loader(self, split: str) -> DataLoader:
        items = self.eval_items[split]
        if len(items) == 0:
            raise ValueError(f"the {split} split is empty: give a {split} list or a non-zero percentage")
        dataset = ClipBatches(self.cache, self.clip_targets(), self.eval_silence[split])
        # Disjoint, unpadded shards: summed metric states over ranks equal a single-process evaluation.
        replicas, rank = self._world()
        return self._loader(dataset, items[rank::replicas].tolist())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("testing")

    # ---- on the device -----------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.trainer is not None and self.trainer.training
        if "ids" in batch:
            batch = self.gather_on_device(batch, "training" if train else self._eval_split())
        if train:
            batch = self.with_hard_negatives(batch)
        return self.to_model_input(batch, train), batch["targets"]

    def _eval_split(self) -> str:
        return "testing" if self.trainer is not None and self.trainer.testing else "validation"

    def gather_on_device(self, batch: dict, split: str) -> dict:
        """The ClipBatches batch of `batch["ids"]`, built from the cache held on their device."""
        ids = batch["ids"]
        key = str(ids.device)
        if key not in self._device_batches:  # one copy of the cache per device, shared by every split
            self._device_batches[key] = DeviceClipBatches(self.cache, self.clip_targets(), ids.device)
        silence = None
        if split != "training":  # the fixed silence draw, moved once per split and device
            silence_key = f"{split}@{key}"
            if silence_key not in self._device_silence:
                self._device_silence[silence_key] = torch.from_numpy(self.eval_silence[split]).to(ids.device)
            silence = self._device_silence[silence_key]
        return self._device_batches[key](ids, silence)

    def with_hard_negatives(self, batch: dict) -> dict:
        """A training batch with keyword clips cut to half a word and relabelled unknown
        (`augment.stream.half_keyword_unknown`; off: the batch itself)."""
        p = self.augment.stream.half_keyword_unknown
        if p <= 0:
            return batch
        # Labels are silence, unknown, then the keywords (kws_lightning.labels).
        waves, targets = cut_keyword_halves(
            batch["waves"], batch["lengths"], batch["targets"], p, UNKNOWN_INDEX, UNKNOWN_INDEX + 1
        )
        return {**batch, "waves": waves, "targets": targets}

    def to_model_input(self, batch: dict, train: bool) -> torch.Tensor:
        """The device-side half of the input path (also usable without a Trainer, e.g. in benchmarks)."""
        waves = batch["waves"]
        self.noise.to(waves.device)
        return prepare_batch(
            waves,
            batch["lengths"],
            batch["synth_silence"],
            self.noise,
            self.augment,
            train,
        )

    def class_counts(self, split: str) -> dict[str, int]:
        """How many items of each class one epoch (training) or the fixed draw (validation/testing) holds."""
        if split == "training":
            items = self.train_sampler.epoch_items()
        else:
            items = self.eval_items[split]
        targets = np.where(items < 0, 0, self.clip_targets()[np.maximum(items, 0)])
        counts = np.bincount(targets, minlength=self.num_classes)
        return dict(zip(self.labels, counts.tolist(), strict=True))
