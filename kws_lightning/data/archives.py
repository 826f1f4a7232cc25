"""The registry of official Speech Commands archives, and how a request (name, url, sha256, mirror) resolves.

URLs are the ones torchaudio's ``SPEECHCOMMANDS(download=True)`` uses. Checksums: the training sets'
SHA-256 are the ones torchaudio publishes; the v0.02 test set's size and SHA-256 are the ones TensorFlow
Datasets publishes (``tensorflow_datasets/url_checksums/speech_commands.txt``). No size or checksum was
found published for the v0.01 test set: its download is checked against the server's Content-Length
only, and the tool says that its content is unverified.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from urllib.parse import urlsplit

OFFICIAL_BASE_URL = "http://download.tensorflow.org/data"
MARKER_NAME = ".kws_download.json"


@dataclass(frozen=True)
class ArchiveSpec:
    """What to fetch and how to trust it. `sha256` None: content unverified (size only, when known)."""

    name: str | None  # registry name (v0.02, test_v0.02, ...) or None for an arbitrary url
    url: str
    sha256: str | None
    size: int | None
    layout: str  # "training" (word folders + lists), "test" (_silence_/_unknown_/keywords) or "unknown"
    checksum_source: str  # where sha256 / size come from, for the messages

    @property
    def filename(self) -> str:
        """The archive's file name, from the URL's path."""
        name = PurePosixPath(urlsplit(self.url).path).name
        return name or "archive.tar.gz"

    @property
    def folder(self) -> str:
        """The default folder name under paths.data_dir: the archive name without its extension."""
        name = self.filename
        for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name


def _official(name: str, archive: str, sha256: str | None, size: int | None, layout: str, source: str):
    return ArchiveSpec(name, f"{OFFICIAL_BASE_URL}/{archive}", sha256, size, layout, source)


DATASETS: dict[str, ArchiveSpec] = {
    spec.name: spec
    for spec in (
        _official(
            "v0.01",
            "speech_commands_v0.01.tar.gz",
            "743935421bb51cccdb6bdd152e04c5c70274e935c82119ad7faeec31780d811d",
            None,
            "training",
            "torchaudio's published SHA-256",
        ),
        _official(
            "v0.02",
            "speech_commands_v0.02.tar.gz",
            "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
            2428923189,
            "training",
            "torchaudio's and TensorFlow Datasets' published SHA-256",
        ),
        _official(
            "test_v0.01",
            "speech_commands_test_set_v0.01.tar.gz",
            None,
            None,
            "test",
            "none published: the size is checked against the server's Content-Length only",
        ),
        _official(
            "test_v0.02",
            "speech_commands_test_set_v0.02.tar.gz",
            "cc2a00c1147c2254e9be3fa0f779d8c17421dc349b86366567a8edfa9acd51df",
            112563277,
            "test",
            "TensorFlow Datasets' published size and SHA-256",
        ),
    )
}
TEST_SETS = tuple(name for name, spec in DATASETS.items() if spec.layout == "test")


class ArchiveRequestError(ValueError):
    """A download request that cannot be resolved (unknown name, bad checksum string, ...)."""


def normalise_sha256(value: str | None) -> str | None:
    """Lower-case hex, or None; anything else is an error naming the value."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ArchiveRequestError(
            f"sha256={value!r} is not a SHA-256 (64 hex digits); `sha256sum ARCHIVE` prints one"
        )
    return text


def with_mirror(url: str, mirror: str) -> str:
    """`url` with its host and folder swapped for `mirror` (the archive's file name is kept)."""
    return f"{mirror.rstrip('/')}/{PurePosixPath(urlsplit(url).path).name}"


def resolve_archive(
    dataset: str | None = None, url: str | None = None, sha256: str | None = None, mirror: str | None = None
) -> ArchiveSpec:
    """The archive a request names.

    - `dataset` alone: the registry entry (its official URL, checksum, size);
    - `dataset` + `mirror`: the same archive from ``<mirror>/<archive name>``, same checksum;
    - `url` (+ `sha256`): that archive; with `dataset` too it is taken as a copy of that data set (its
      published checksum applies unless `sha256` is given). Without any checksum the content is unverified.
    """
    sha = normalise_sha256(sha256)
    if dataset is None and url is None:
        raise ArchiveRequestError(
            f"nothing to download: give dataset=NAME (one of {', '.join(DATASETS)}) or url=URL sha256=HEX"
        )
    if dataset is not None and dataset not in DATASETS:
        raise ArchiveRequestError(f"dataset={dataset!r} is not known: choose one of {', '.join(DATASETS)}")
    if dataset is None:
        source = "the sha256= given" if sha else "no sha256= given"
        return ArchiveSpec(None, str(url), sha, None, "unknown", source)
    spec = DATASETS[dataset]
    if url is not None:
        spec = replace(spec, url=str(url))
    elif mirror:
        spec = replace(spec, url=with_mirror(spec.url, mirror))
    if sha is not None and sha != spec.sha256:
        # A private copy with its own checksum: the published size no longer applies either.
        spec = replace(spec, sha256=sha, size=None, checksum_source="the sha256= given")
    return spec
