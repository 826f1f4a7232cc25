"""Decode every clip once into one int16 array plus offsets, cached on disk, checked and memory-mapped.

The full v0.01 set (~65k clips) is ~2 GB as int16; a float32 copy would double that, so the cache
stays int16 and is converted to float only on the device, batch by batch. Memory-mapping the cached
``.npy`` lets every process on a machine (DataLoader workers, DDP ranks) share one copy via the page cache.

A cache folder ``waves-<key>`` is named by the clip list with each file's size, mtime and ctime (a
rewrite with its mtime put back still changes the ctime). ``done.json`` records CRC-32 checksums of
its arrays (a damaged or overwritten cache; 4x cheaper than a cryptographic hash, and nobody who can
write the cache needs to forge one) and ``sources.npy`` the blake2b of every source file's bytes
(hashed while decoding: what the clip was built from). A cache that cannot be read or fails its
check is reported in one line and rebuilt; ``verify`` chooses how much is checked on a hit:

- ``off``: trust it (only what loading needs: readable files, consistent lengths);
- ``quick`` (default): metadata, shapes, offsets and the checksums of the cache's own arrays;
- ``full``: quick + re-read and re-hash every source file (catches edits invisible to the file stats).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from kws_lightning.data.audio_io import (
    DIGEST_SIZE,
    AudioReadError,
    DecodedAudio,
    decode_audio,
    file_digest,
    read_file_bytes,
)
from kws_lightning.data.issues import CROPPED, SKIPPED, ClipIssue

log = logging.getLogger(__name__)
_CACHE_FORMAT = 2  # bump when the on-disk layout or decoding changes
VerifyMode = Literal["full", "quick", "off"]
VERIFY_MODES = ("full", "quick", "off")
# Speech Commands clips are 1 s: 3 s leaves room for longer recordings while a stray 10-minute file in
# a word folder no longer pads every batch it lands in to 10 minutes.
DEFAULT_MAX_CLIP_S = 3.0
DONE = "done.json"
_ARRAYS = ("samples", "offsets", "sources")
_HASH_CHUNK = 16 << 20  # bytes per leaf of an array checksum (fixed: it must not depend on threads)
_ABANDONED_S = 24 * 3600  # an unfinished cache folder this old is a killed build, not one in progress


class CacheError(Exception):
    """A cache folder that cannot be used; the message says what was wrong with it."""


@dataclass
class WaveCache:
    """Clip ``i`` is ``samples[offsets[i]:offsets[i + 1]]``; a skipped clip has length 0."""

    samples: np.ndarray  # int16, possibly a read-only memmap
    offsets: np.ndarray  # int64, len(clips) + 1
    issues: list[ClipIssue] = field(default_factory=list)  # skipped and cropped clips
    sources: np.ndarray | None = None  # uint8 (clips, DIGEST_SIZE): blake2b of each file (0: skipped)

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

    @property
    def failures(self) -> list[ClipIssue]:
        """The skipped clips."""
        return [i for i in self.issues if i.action == SKIPPED]


def _stat_signature(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def cache_key(paths: Sequence[str], sample_rate: int, max_samples: int | None = None) -> str:
    """Hash of the file list with sizes, mtimes and ctimes: an added, removed or rewritten clip changes it."""
    digest = hashlib.sha1(f"v{_CACHE_FORMAT}|{sample_rate}|{max_samples}".encode())
    for path in paths:
        digest.update(f"\n{path}|{_stat_signature(path)}".encode())
    return digest.hexdigest()[:16]


def _decode(path: str, sample_rate: int, max_samples: int | None) -> DecodedAudio | ClipIssue:
    try:
        return decode_audio(path, sample_rate, max_samples)
    except AudioReadError as error:
        return ClipIssue(error.path, SKIPPED, error.reason)


def decode_clips(
    paths: Sequence[str], sample_rate: int = 16000, threads: int = 4, max_samples: int | None = None
) -> WaveCache:
    """Decode `paths` in threads (file reads, hashing and libsndfile release the GIL) into one int16 array."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(lambda p: _decode(p, sample_rate, max_samples), paths, chunksize=64))
    issues = [d for d in decoded if isinstance(d, ClipIssue)]
    issues += [ClipIssue(p, CROPPED, d.note) for p, d in zip(paths, decoded, strict=True) if _noted(d)]
    waves = [np.zeros(0, np.int16) if isinstance(d, ClipIssue) else d.samples for d in decoded]
    offsets = np.zeros(len(waves) + 1, np.int64)
    np.cumsum([len(w) for w in waves], out=offsets[1:])
    samples = np.concatenate(waves) if waves else np.zeros(0, np.int16)
    sources = np.zeros((len(paths), DIGEST_SIZE), np.uint8)
    for row, item in enumerate(decoded):
        if isinstance(item, DecodedAudio):
            sources[row] = np.frombuffer(item.digest, np.uint8)
    return WaveCache(samples, offsets, issues, sources)


def _noted(item: DecodedAudio | ClipIssue) -> bool:
    return isinstance(item, DecodedAudio) and item.note is not None


def array_checksum(array: np.ndarray, threads: int = 4) -> str:
    """CRC-32 of each fixed-size leaf of an array's bytes, in parallel (zlib releases the GIL), joined
    with the dtype and shape into one hex string."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    leaves = [flat[i : i + _HASH_CHUNK] for i in range(0, len(flat), _HASH_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        crcs = list(pool.map(zlib.crc32, leaves))
    root = hashlib.blake2b(f"{array.dtype.str}|{array.shape}".encode(), digest_size=16)
    root.update(np.asarray(crcs, np.uint32).tobytes())
    return root.hexdigest()


def _manifest(cache: WaveCache, sample_rate: int, max_samples: int | None, threads: int) -> dict:
    arrays = {name: getattr(cache, name) for name in _ARRAYS}
    return {
        "format": _CACHE_FORMAT,
        "clips": len(cache),
        "sample_rate": sample_rate,
        "max_samples": max_samples,
        "arrays": {
            name: {"shape": list(a.shape), "dtype": a.dtype.str, "crc32": array_checksum(a, threads)}
            for name, a in arrays.items()
        },
        "issues": [asdict(i) for i in cache.issues],
    }


def _array_spec(record: dict) -> dict:
    """Every field this version reads from an array's record, so a partial or older record fails at once."""
    return {"shape": list(record["shape"]), "dtype": str(record["dtype"]), "crc32": str(record["crc32"])}


def _load_array(folder: Path, name: str, spec: dict, mmap: bool) -> np.ndarray:
    path = folder / f"{name}.npy"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise CacheError(f"{path.name} cannot be read ({error.strerror or error})") from None
    if magic != b"\x93NUMPY":  # numpy would blame "pickled data" on a damaged header
        raise CacheError(f"{path.name} is not a .npy file any more (its header is damaged)")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError / OSError / EOFError for a damaged file
        raise CacheError(f"{path.name} cannot be loaded ({type(error).__name__}: {error})") from None
    if list(array.shape) != list(spec["shape"]) or array.dtype.str != spec["dtype"]:
        raise CacheError(
            f"{path.name} holds {array.dtype.str} {list(array.shape)}, {DONE} records "
            f"{spec['dtype']} {list(spec['shape'])}"
        )
    return array


def _changed_sources(paths: Sequence[str], sources: np.ndarray, threads: int) -> list[str]:
    """Source files whose bytes no longer hash to the recorded digest (skipped clips are not re-read)."""

    def changed(row: int) -> bool:
        try:
            return file_digest(read_file_bytes(paths[row])) != sources[row].tobytes()
        except AudioReadError:
            return True

    rows = np.flatnonzero(sources.any(axis=1)).tolist()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        flags = list(pool.map(changed, rows, chunksize=64))
    return [paths[r] for r, flag in zip(rows, flags, strict=True) if flag]


def open_cache(
    folder: Path,
    paths: Sequence[str],
    sample_rate: int,
    max_samples: int | None,
    verify: VerifyMode = "quick",
    threads: int = 4,
) -> WaveCache:
    """The cache in `folder`, checked as `verify` says; raises CacheError saying what is wrong."""
    try:
        meta = json.loads((folder / DONE).read_text())
        specs = {name: _array_spec(meta["arrays"][name]) for name in _ARRAYS}
        issues = [ClipIssue(**i) for i in meta["issues"]]
        recorded = (meta["format"], meta["clips"], meta["sample_rate"], meta["max_samples"])
    except Exception as error:  # not JSON, or JSON without the fields this version writes
        raise CacheError(f"{DONE} is unreadable ({type(error).__name__}: {error})") from None
    expected = (_CACHE_FORMAT, len(paths), sample_rate, max_samples)
    if recorded != expected:
        raise CacheError(
            f"{DONE} records (format, clips, sample_rate, max_samples) {recorded}, expected {expected}"
        )
    cache = WaveCache(
        _load_array(folder, "samples", specs["samples"], mmap=True),
        _load_array(folder, "offsets", specs["offsets"], mmap=False),
        issues,
        _load_array(folder, "sources", specs["sources"], mmap=False),
    )
    offsets = cache.offsets
    if len(offsets) != len(paths) + 1 or offsets[0] != 0 or offsets[-1] != len(cache.samples):
        raise CacheError(f"offsets.npy does not span samples.npy ({len(cache.samples)} samples)")
    if verify == "off":
        return cache
    if (np.diff(offsets) < 0).any():
        raise CacheError("offsets.npy is not increasing")
    for name in _ARRAYS:
        if array_checksum(getattr(cache, name), threads) != specs[name]["crc32"]:
            raise CacheError(f"{name}.npy does not match its checksum in {DONE}: modified or corrupted")
    if verify == "full":
        changed = _changed_sources(paths, cache.sources, threads)
        if changed:
            raise CacheError(
                f"{len(changed)} source clip(s) changed since it was built (content hash differs), first: "
                f"{changed[0]}"
            )
    return cache


def _write(folder: Path, cache: WaveCache, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Drop the marker first: a build killed half-way never leaves old metadata over new arrays. Then write
    # under per-process temporary names and rename: two processes building the same cache at once (nodes
    # sharing a cache_dir) never write into each other's files; the last rename wins with identical content.
    (folder / DONE).unlink(missing_ok=True)
    tag = f"tmp-{os.getpid()}"
    for name in _ARRAYS:
        tmp = folder / f"{name}.{tag}.npy"
        np.save(tmp, getattr(cache, name))
        os.replace(tmp, folder / f"{name}.npy")
    tmp_marker = folder / f"{DONE}.{tag}"
    tmp_marker.write_text(json.dumps(manifest))
    os.replace(tmp_marker, folder / DONE)


def prune_caches(cache_dir: str | Path, keep: int, current: Path | None = None) -> list[Path]:
    """Delete all but the `keep` most recently used ``waves-*`` folders (`current` always stays), and
    unfinished ones older than a day (killed builds). Returns the folders removed."""
    folders = [d for d in Path(cache_dir).glob("waves-*") if d.is_dir() and d != current]

    def last_used(folder: Path) -> float:
        try:
            return (folder / DONE).stat().st_mtime
        except OSError:
            return -1.0

    complete = sorted((d for d in folders if last_used(d) >= 0), key=last_used, reverse=True)
    stale = complete[max(0, keep - (current is not None)) :]
    now = time.time()
    stale += [d for d in folders if last_used(d) < 0 and now - d.stat().st_mtime > _ABANDONED_S]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def check_cache_settings(verify: str, keep: int | None) -> None:
    """ValueError naming the key when `verify` is not a mode or `keep` is below 1."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"data.verify_cache={verify!r} is not a mode; valid: {list(VERIFY_MODES)}")
    if keep is not None and keep < 1:
        raise ValueError(f"data.keep_caches={keep} must be at least 1 (null: never prune)")


def load_or_build(
    paths: Sequence[str],
    cache_dir: str | Path | None,
    sample_rate: int = 16000,
    threads: int = 4,
    max_samples: int | None = None,
    verify: VerifyMode = "quick",
    keep: int | None = None,
) -> WaveCache:
    """Decoded clips for `paths`, from ``cache_dir/waves-<key>`` when present and sound, else decoded and
    saved there. With ``cache_dir=None`` nothing is written (decode in RAM only). `keep`: prune the cache
    folder to this many ``waves-*`` caches (None: never prune). Skipped and cropped clips are in
    ``.issues``; reporting them is the caller's job (`kws_lightning.data.issues.report_issues`).
    """
    check_cache_settings(verify, keep)
    if cache_dir is None:
        return decode_clips(paths, sample_rate, threads, max_samples)
    folder = Path(cache_dir) / f"waves-{cache_key(paths, sample_rate, max_samples)}"
    cache = None
    if (folder / DONE).exists():
        started = time.perf_counter()
        try:
            cache = open_cache(folder, paths, sample_rate, max_samples, verify, threads)
        except CacheError as error:
            log.warning("wave cache %s is unusable, rebuilding it: %s", folder, error)
        else:
            log.info(
                "wave cache hit: %s (%d clips; verify_cache=%s took %.2f s)",
                folder,
                len(cache),
                verify,
                time.perf_counter() - started,
            )
            try:
                os.utime(folder / DONE)  # "last used", for pruning
            except OSError:
                pass  # a read-only shared cache: fine, it is just never the newest
    if cache is None:
        cache = decode_clips(paths, sample_rate, threads, max_samples)
        _write(folder, cache, _manifest(cache, sample_rate, max_samples, threads))
        mb = cache.samples.nbytes / 1e6
        log.info("wave cache written: %s (%d clips, %.1f MB)", folder, len(paths), mb)
        cache.samples = np.load(folder / "samples.npy", mmap_mode="r")
    if keep is not None:
        removed = prune_caches(cache_dir, keep, folder)
        if removed:
            log.info("pruned %d stale wave cache(s) from %s (keep_caches=%d)", len(removed), cache_dir, keep)
    return cache
