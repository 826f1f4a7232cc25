"""`python -m kws_lightning.data.download dataset=NAME [root=DIR]`: fetch, verify and unpack Speech Commands.

Examples::

    python -m kws_lightning.data.download dataset=v0.02                  # -> data/speech_commands_v0.02
    python -m kws_lightning.data.download dataset=test_v0.02             # the official test set
    python -m kws_lightning.data.download dataset=v0.01 root=/data/sc1
    python -m kws_lightning.data.download dataset=v0.02 mirror=https://storage.googleapis.com/download.tensorflow.org/data
    python -m kws_lightning.data.download url=file:///tmp/speech_commands_v0.02.tar.gz dataset=v0.02
    python -m kws_lightning.data.download url=https://host/copy.tar.gz sha256=HEX root=data/copy

The work is in `kws_lightning.data.provision` (archives.py: the registry; fetch.py: HTTP; extract.py:
verify and unpack). Every failure exits with status 1 and one line on stderr naming the cause and the fix.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

EXIT_FAILED = 1


def download(cfg: DictConfig) -> Path:
    """Prepare the folder the config asks for; prints where it is and what it holds."""
    from kws_lightning.data.archives import resolve_archive
    from kws_lightning.data.provision import ensure_dataset

    spec = resolve_archive(cfg.dataset, cfg.url, cfg.sha256, cfg.mirror)
    if cfg.root is None and spec.name is None:
        raise ValueError("url= without dataset= needs root=DIR: where to unpack it")
    root = Path(cfg.root if cfg.root is not None else Path(cfg.paths.data_dir) / spec.folder)
    started = time.perf_counter()
    result = ensure_dataset(
        spec,
        root,
        force=cfg.force,
        keep_archive=cfg.keep_archive,
        retries=cfg.retries,
        timeout=cfg.timeout,
        progress=cfg.progress,
        backoff_s=cfg.backoff_s,
    )
    elapsed = time.perf_counter() - started
    marker = result.marker
    state = "already there (marker checked, nothing downloaded)" if result.already_present else "ready"
    verified = "verified" if marker.get("verified") else "UNVERIFIED: no checksum to compare with"
    print(f"{result.root}: {state} in {elapsed:.4f} s")
    print(
        f"  {marker.get('files')} files from {marker.get('url')}, sha256 {marker.get('sha256')} ({verified})"
    )
    if spec.layout == "training":
        print(f"  train on it: python -m kws_lightning.train data.root={result.root}")
    elif spec.layout == "test":
        print(f"  score on it: python -m kws_lightning.eval ckpt_path=CKPT input={result.root}")
    return result.root


@hydra.main(version_base="1.3", config_path="../../conf", config_name="download")
def main(cfg: DictConfig) -> None:
    from kws_lightning.data.archives import ArchiveRequestError
    from kws_lightning.data.extract import ArchiveError
    from kws_lightning.data.fetch import DownloadError

    try:
        download(cfg)
    except (ArchiveRequestError, ArchiveError, DownloadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume the download", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
