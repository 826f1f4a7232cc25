"""Decode every clip once into one int16 array plus offsets, cached on disk and memory-mapped.

The full v0.01 set (~65k clips) is ~2 GB as int16; a float32 copy would double that, so the cache
stays int16 and is converted to float only on the device, batch by batch. Memory-mapping the cached
``.npy`` lets every process on a machine (DataLoader workers, DDP ranks) share one copy via the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kws_lightning.data.audio_io import AudioReadError, read_audio_int16

log = logging.getLogger(__name__)
_CACHE_FORMAT = 1  # bump when the on-disk layout or decoding changes


@dataclass
class DecodeFailure:
    path: str
    reason: str


@dataclass
class WaveCache:
    """Clip ``i`` is ``samples[offsets[i]:offsets[i + 1]]``; a failed clip has length 0."""

    samples: np.ndarray  # int16, possibly a read-only memmap
    offsets: np.ndarray  # int64, len(clips) + 1
    failures: list[DecodeFailure]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def clip(self, index: int) -> np.ndarray:
        return self.samples[self.offsets[index] : self.offsets[index + 1]]

    @property
    def ok(self) -> np.ndarray:
        """Mask of clips that decoded (length > 0)."""
        return self.lengths > 0


def cache_key(paths: Sequence[str], sample_rate: int) -> str:
    """Hash of the file list with sizes and mtimes: any added, removed or rewritten clip changes it."""
    digest = hashlib.sha1(f"v{_CACHE_FORMAT}|{sample_rate}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"\n{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"\n{path}|missing".encode())
    return digest.hexdigest()[:16]


def _decode(path: str, sample_rate: int) -> np.ndarray | DecodeFailure:
    try:
        return read_audio_int16(path, sample_rate)
    except AudioReadError as error:
        return DecodeFailure(error.path, error.reason)


def decode_clips(paths: Sequence[str], sample_rate: int = 16000, threads: int = 4) -> WaveCache:
    """Decode `paths` in threads (libsndfile releases the GIL) into one contiguous int16 array."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(lambda p: _decode(p, sample_rate), paths, chunksize=64))
    failures = [d for d in decoded if isinstance(d, DecodeFailure)]
    waves = [np.zeros(0, np.int16) if isinstance(d, DecodeFailure) else d for d in decoded]
    offsets = np.zeros(len(waves) + 1, np.int64)
    np.cumsum([len(w) for w in waves], out=offsets[1:])
    samples = np.concatenate(waves) if waves else np.zeros(0, np.int16)
    return WaveCache(samples, offsets, failures)


def report_failures(failures: Sequence[DecodeFailure], total: int) -> None:
    """One warning for all unreadable clips: the count and the first few paths with reasons."""
    if failures:
        first = "; ".join(f"{f.path} ({f.reason})" for f in failures[:3])
        log.warning(
            "skipped %d of %d clips that could not be decoded; first: %s. Delete or re-export them.",
            len(failures),
            total,
            first,
        )


def load_or_build(
    paths: Sequence[str], cache_dir: str | Path | None, sample_rate: int = 16000, threads: int = 4
) -> WaveCache:
    """Decoded clips for `paths`, from ``cache_dir/waves-<key>`` when present, else decoded and saved there.

    With ``cache_dir=None`` nothing is written (decode in RAM only).
    """
    if cache_dir is None:
        cache = decode_clips(paths, sample_rate, threads)
        report_failures(cache.failures, len(paths))
        return cache
    folder = Path(cache_dir) / f"waves-{cache_key(paths, sample_rate)}"
    done_marker = folder / "done.json"
    if done_marker.is_file():
        meta = json.loads(done_marker.read_text())
        cache = WaveCache(
            np.load(folder / "samples.npy", mmap_mode="r"),
            np.load(folder / "offsets.npy"),
            [DecodeFailure(**f) for f in meta["failures"]],
        )
        if len(cache) == len(paths):
            log.info("wave cache hit: %s (%d clips)", folder, len(cache))
            report_failures(cache.failures, len(paths))
            return cache
    cache = decode_clips(paths, sample_rate, threads)
    report_failures(cache.failures, len(paths))
    folder.mkdir(parents=True, exist_ok=True)
    # Write under per-process temporary names, then rename: a killed run never leaves a cache that looks
    # complete, and two processes building the same cache at once (nodes sharing a cache_dir) never
    # write into each other's files; the last rename wins with identical content.
    tag = f"tmp-{os.getpid()}"
    for name, array in (("samples", cache.samples), ("offsets", cache.offsets)):
        tmp = folder / f"{name}.{tag}.npy"
        np.save(tmp, array)
        os.replace(tmp, folder / f"{name}.npy")
    meta = {"clips": len(paths), "sample_rate": sample_rate, "failures": [f.__dict__ for f in cache.failures]}
    tmp_marker = folder / f"done.json.{tag}"
    tmp_marker.write_text(json.dumps(meta))
    os.replace(tmp_marker, done_marker)
    log.info("wave cache written: %s (%d clips, %.1f MB)", folder, len(paths), cache.samples.nbytes / 1e6)
    return WaveCache(np.load(folder / "samples.npy", mmap_mode="r"), cache.offsets, cache.failures)
