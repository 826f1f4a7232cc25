"""Download, verify and unpack (kws_lightning.data.download / provision / fetch / extract), with no network:
a real stdlib HTTP server on 127.0.0.1 (Range support, request log, connections cut on demand) serves
archives built here from generated clips."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from audio_trees import make_training_tree, tone, write_wav

from kws_lightning.data import archives
from kws_lightning.data.archives import MARKER_NAME, ArchiveRequestError, resolve_archive
from kws_lightning.data.extract import ArchiveError, ChecksumMismatch, UnsafeArchiveError, sha256_file
from kws_lightning.data.fetch import DownloadError, fetch
from kws_lightning.data.index import DataLayoutError, detect_layout, index_training_layout
from kws_lightning.data.provision import ensure_dataset, resolve_test_set_input
from kws_lightning.labels import DEFAULT_KEYWORDS

REPO = Path(__file__).resolve().parents[1]
WORDS = [*DEFAULT_KEYWORDS, "bed", "cat"]
SPEAKERS = 6  # speaker 4's clips are the validation list, speaker 5's the testing list


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not take the requests to 127.0.0.1."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# ---- the server ---------------------------------------------------------------------------------------


class ArchiveServer:
    """Serves `files` (URL path -> bytes). `requests` logs (path, Range header); `cut[path] = n` sends
    only the first n body bytes of the next response for path, then closes the connection; `fail[path]`
    lists status codes to answer first; `ignore_range` answers every request with the whole file (200)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.fail: dict[str, list[int]] = {}
        self.ignore_range = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.requests.append((self.path, self.headers.get("Range")))
                if owner.fail.get(self.path):
                    self.send_error(owner.fail[self.path].pop(0))
                    return
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, wanted = 0, self.headers.get("Range")
                if wanted and not owner.ignore_range:
                    start = int(wanted.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = owner.cut.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> ArchiveServer:
    srv = ArchiveServer()
    yield srv
    srv.stop()


# ---- archives built from generated clips --------------------------------------------------------------


def speech_commands_tree(root: Path) -> Path:
    """A small v0.02-shaped training folder: 12 words x 6 speakers, noise, validation / testing lists."""
    make_training_tree(root, {word: SPEAKERS for word in WORDS}, speakers=SPEAKERS, noise_seconds=2.0)
    lists = {"validation_list.txt": 4, "testing_list.txt": 5}
    for name, speaker in lists.items():
        tag = f"{speaker * 7919:08x}_nohash_"
        entries = sorted(f"{p.parent.name}/{p.name}" for p in root.glob(f"*/{tag}*.wav"))
        (root / name).write_text("\n".join(entries) + "\n")
    (root / "LICENSE").write_text("test clips\n")
    return root


def official_test_tree(root: Path) -> Path:
    """An official-test-set-shaped folder: keyword folders, _unknown_, _silence_."""
    for w, word in enumerate(DEFAULT_KEYWORDS):
        write_wav(root / word / f"{w:08x}_nohash_0.wav", tone(1.0, 200.0 + 90 * w))
    write_wav(root / "_unknown_" / "bed_0000abcd_nohash_0.wav", tone(1.0, 1500.0))
    write_wav(root / "_silence_" / "silence_0.wav", tone(1.0, 50.0, amp=0.01))
    return root


def tar_gz(folder: Path, out: Path, evil: tarfile.TarInfo | None = None, evil_data: bytes = b"x") -> bytes:
    """`folder` as ./-prefixed members (as the official archives have them), then `evil` if given."""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=".")
        if evil is not None:
            evil.size = len(evil_data) if evil.isfile() else 0
            tar.addfile(evil, io.BytesIO(evil_data) if evil.isfile() else None)
    return out.read_bytes()


@pytest.fixture(scope="module")
def train_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    work = tmp_path_factory.mktemp("train_archive")
    data = tar_gz(speech_commands_tree(work / "tree"), work / "speech_commands_v0.02.tar.gz")
    return data, sha256_file(work / "speech_commands_v0.02.tar.gz")


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def looks_complete(parent: Path) -> list[Path]:
    """Anything under `parent` a later run could mistake for a finished download."""
    return [p for p in parent.rglob(MARKER_NAME)] + [
        p for p in parent.rglob("*.tar.gz") if ".part" not in p.name
    ]


def serve(server: ArchiveServer, data: bytes, name: str = "speech_commands_v0.02.tar.gz") -> str:
    server.files[f"/data/{name}"] = data
    return server.url(f"/data/{name}")


def spec_for(url: str, sha: str | None) -> archives.ArchiveSpec:
    return resolve_archive(url=url, sha256=sha)


def run_download(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m kws_lightning.data.download overrides...` in a real subprocess."""
    import os

    env = {**os.environ, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
    return subprocess.run(
        [sys.executable, "-m", "kws_lightning.data.download", f"paths.log_dir={cwd / 'logs'}", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---- the scenarios ------------------------------------------------------------------------------------


def test_download_verify_unpack_then_train_two_steps(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path, run_cli: object
) -> None:
    data, sha = train_archive
    url = serve(server, data)
    root = tmp_path / "data" / "speech_commands_v0.02"
    result = ensure_dataset(spec_for(url, sha), root, progress=False)
    assert not result.already_present and result.root == root
    assert result.marker["sha256"] == sha and result.marker["verified"] is True
    assert (root / MARKER_NAME).is_file() and (root / "validation_list.txt").is_file()
    # The download, its folder, the lock and the temporary extraction folder are gone.
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["speech_commands_v0.02"]
    dataset = index_training_layout(root)
    assert dataset.split_source == "lists" and len(dataset.clips) == len(WORDS) * SPEAKERS

    cache = tmp_path / "cache"
    run = run_cli(
        "train",
        "data=speech_commands",
        f"data.root={root}",
        "data.batch_size=16",
        "model.n_feature_maps=8",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "callbacks.tensorboard_extras=null",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert "final metrics:" in run.stdout
    assert re.search(r"training: 48 clips", run.stdout + run.stderr), (run.stdout + run.stderr)[-3000:]


def test_datamodule_download_true_fetches_on_first_use(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data=speech_commands_v2 data.download=true: prepare_data fetches the registry's v0.02 (pointed at
    the local server here) into data.root, then indexes it; a missing root without download names the fix."""
    from kws_lightning.data.datamodule import SpeechCommandsDataModule

    data, sha = train_archive
    url = serve(server, data)
    fake = replace(archives.DATASETS["v0.02"], url=url, sha256=sha, size=len(data))
    monkeypatch.setitem(archives.DATASETS, "v0.02", fake)
    root = tmp_path / "speech_commands_v0.02"

    missing = SpeechCommandsDataModule(root=str(root), dataset="v0.02", cache_dir=None)
    with pytest.raises(DataLayoutError, match="data.download=true"):
        missing.prepare_data()
    assert server.requests == []

    dm = SpeechCommandsDataModule(
        root=str(root), dataset="v0.02", download=True, cache_dir=None, batch_size=8
    )
    dm.prepare_data()
    dm.setup("fit")
    assert (root / MARKER_NAME).is_file() and len(server.requests) == 1
    assert len(dm.dataset.clips) == len(WORDS) * SPEAKERS and dm.dataset.split_source == "lists"
    waves, targets = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert waves.shape == (8, 16000) and targets.shape == (8,)

    SpeechCommandsDataModule(root=str(root), dataset="v0.02", download=True, cache_dir=None).prepare_data()
    assert len(server.requests) == 1  # the marker answered: no second request
    with pytest.raises(ValueError, match="data.dataset"):
        SpeechCommandsDataModule(root=str(root), download=True)


def test_wrong_checksum_is_refused_and_nothing_looks_complete(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path
) -> None:
    data, sha = train_archive
    url = serve(server, data)
    wrong = "0" * 64
    root = tmp_path / "data" / "speech_commands_v0.02"
    # A file of the user's named like the archive, beside root: never taken for a download, never deleted.
    mine = tmp_path / "data" / "speech_commands_v0.02.tar.gz"
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own file")
    with pytest.raises(ChecksumMismatch) as caught:
        ensure_dataset(spec_for(url, wrong), root, progress=False)
    message = str(caught.value)
    print(f"\nchecksum mismatch message: {message}")
    assert wrong in message and sha in message and "deleted it" in message
    assert not root.exists() and not list(tmp_path.rglob(MARKER_NAME))
    assert list((tmp_path / "data").iterdir()) == [mine] and mine.read_bytes() == b"the user's own file"


def test_cut_connection_resumes_from_the_partial_file(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, sha = train_archive
    url = serve(server, data)
    half = len(data) // 2
    server.cut["/data/speech_commands_v0.02.tar.gz"] = half
    root = tmp_path / "speech_commands_v0.02"
    with pytest.raises(DownloadError) as caught:
        ensure_dataset(spec_for(url, sha), root, retries=0, progress=False)
    print(f"\ncut connection message: {caught.value}")
    assert f"connection closed after {half} of {len(data)} bytes" in str(caught.value)
    part = tmp_path / ".speech_commands_v0.02.download" / "speech_commands_v0.02.tar.gz.part"
    assert part.stat().st_size == half and not root.exists()

    caplog.set_level("INFO")
    result = ensure_dataset(spec_for(url, sha), root, retries=0, progress=False)
    assert server.requests[-1] == ("/data/speech_commands_v0.02.tar.gz", f"bytes={half}-")
    assert result.marker["sha256"] == sha and not part.exists()
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    print(f"resume message: {resumed}")
    assert resumed and f"from byte {half}" in resumed[0]


def test_retries_resume_within_one_call_and_after_a_5xx(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path
) -> None:
    data, sha = train_archive
    url = serve(server, data)
    path = "/data/speech_commands_v0.02.tar.gz"
    server.fail[path] = [503]
    server.cut[path] = 1000
    dest = fetch(url, tmp_path / "a.tar.gz", len(data), retries=3, backoff_s=0.0, progress=False)
    assert sha256_file(dest) == sha
    assert [r[1] for r in server.requests] == [None, None, "bytes=1000-"]  # 503, cut at 1000, resumed


def test_server_ignoring_range_restarts_cleanly(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, sha = train_archive
    url = serve(server, data)
    server.cut["/data/speech_commands_v0.02.tar.gz"] = 5000
    with pytest.raises(DownloadError):
        fetch(url, tmp_path / "a.tar.gz", retries=0, progress=False)
    server.ignore_range = True
    caplog.set_level("INFO")
    dest = fetch(url, tmp_path / "a.tar.gz", retries=0, progress=False)
    assert server.requests[-1][1] == "bytes=5000-"  # asked to resume, got the whole file
    assert sha256_file(dest) == sha and dest.stat().st_size == len(data)
    assert any("ignored the Range request" in r.getMessage() for r in caplog.records)


HOSTILE = [
    "dotdot",
    "absolute",
    "symlink_etc",
    "hardlink_out",
    "symlink_inside",
    "hardlink_inside",
    "fifo",
    "under_a_file",
    "folder_on_a_file",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_archives_are_refused_and_nothing_is_written_outside(
    kind: str, server: ArchiveServer, tmp_path: Path
) -> None:
    """Speech Commands archives hold only files and folders: any link is refused, even one that stays
    inside (a link is how the symlink-chain attack below gets out)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    name = {
        "dotdot": "./yes/../../../outside/escape.txt",
        "absolute": str(outside / "absolute.txt"),
        "under_a_file": "./yes/00000000_nohash_0.wav/x",
        "folder_on_a_file": "./yes/00000000_nohash_0.wav",
    }
    evil = tarfile.TarInfo(name.get(kind, f"./yes/{kind}"))
    if kind == "folder_on_a_file":
        evil.type = tarfile.DIRTYPE
    links = {
        "symlink_etc": (tarfile.SYMTYPE, "/etc"),
        "hardlink_out": (tarfile.LNKTYPE, "../../etc/passwd"),
        "symlink_inside": (tarfile.SYMTYPE, "00000000_nohash_0.wav"),
        "hardlink_inside": (tarfile.LNKTYPE, "./yes/00000000_nohash_0.wav"),
        "fifo": (tarfile.FIFOTYPE, ""),
    }
    if kind in links:
        evil.type, evil.linkname = links[kind]
    tree = official_test_tree(tmp_path / "tree")
    data = tar_gz(tree, tmp_path / "evil.tar.gz", evil)
    url = serve(server, data, "evil.tar.gz")
    root = tmp_path / "work" / "root"
    with pytest.raises(UnsafeArchiveError) as caught:
        ensure_dataset(spec_for(url, sha256_bytes(data)), root, progress=False)
    print(f"\n{kind}: {caught.value}")
    assert "refused, nothing was unpacked" in str(caught.value) and repr(evil.name) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(outside.iterdir()) == []
    assert not root.exists() and looks_complete(tmp_path / "work") == []
    assert [p.name for p in (tmp_path / "work").iterdir()] == []  # no download or temporary folder left


def escaped(outside: Path) -> list[str]:
    return sorted(p.name for p in outside.iterdir())


def symlink_chain_archive(out: Path, unpack_depth: int, target: Path) -> bytes:
    """CVE-2025-4517's archive, which gets past tarfile's filter="data" on Python < 3.11.13 / 3.12.11:
    16 folders of 247 'd's, each reached through a one-letter link, make a link path whose resolved form
    is longer than PATH_MAX, where os.path.realpath stops resolving. `a/b/.../p/<254 l's>` leads back
    to the unpacking folder (16 '..'); `escape` climbs `unpack_depth` levels from there to '/' and on to
    `target`; then `escape/PWNED` is a plain file."""
    long_name, steps, path = "d" * 247, "abcdefghijklmnop", ""
    with tarfile.open(out, "w:gz") as tar:

        def add(name: str, kind: bytes, linkname: str = "", data: bytes = b"") -> None:
            member = tarfile.TarInfo(name)
            member.type, member.linkname, member.size = kind, linkname, len(data)
            member.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tar.addfile(member, io.BytesIO(data) if data else None)

        for step in steps:
            add(f"{path}{long_name}", tarfile.DIRTYPE)
            add(f"{path}{step}", tarfile.SYMTYPE, long_name)
            path += f"{long_name}/"
        back_home = "/".join(steps) + "/" + "l" * 254
        add(back_home, tarfile.SYMTYPE, "../" * len(steps))
        add("escape", tarfile.SYMTYPE, back_home + "/.." * unpack_depth + str(target))
        add("escape/PWNED", tarfile.REGTYPE, data=b"pwned\n")
    return out.read_bytes()


@pytest.mark.parametrize("entry", ["cli_no_checksum", "verified"])
def test_symlink_chain_past_the_tar_filter_is_refused(
    entry: str, server: ArchiveServer, tmp_path: Path
) -> None:
    """Issue 29: the PATH_MAX symlink chain wrote `PWNED` into any absolute folder, verified or not
    (test_v0.01 has no published checksum). Now its first link is refused and nothing is written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # The archive is unpacked in a hidden folder inside data_dir: one level deeper than data_dir.
    data = symlink_chain_archive(tmp_path / "chain.tar.gz", len(data_dir.resolve().parts), outside.resolve())
    if entry == "cli_no_checksum":
        server.files["/mirror/speech_commands_test_set_v0.01.tar.gz"] = data
        args = ["dataset=test_v0.01", f"mirror={server.url('/mirror')}", f"paths.data_dir={data_dir}"]
        result = run_download(*args, "progress=false", cwd=tmp_path)
        print(f"\n$ python -m kws_lightning.data.download {' '.join(args)}: exit {result.returncode}")
        print(result.stderr[-600:])
        assert "Traceback" not in result.stderr
        message = result.stderr.strip().splitlines()[-1] if result.returncode else "exit 0"
    else:
        spec = spec_for(serve(server, data, "c.tar.gz"), sha256_bytes(data))
        try:
            ensure_dataset(spec, data_dir / "c", progress=False)
            message = "no error"
        except UnsafeArchiveError as error:
            message = f"error: {error}"
    assert escaped(outside) == []
    assert message.startswith("error: ") and "refused, nothing was unpacked" in message
    assert "member 'a' is a symbolic link" in message
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("content", ["html_page", "garbled_gzip"])
def test_a_download_that_is_not_a_tar_archive_is_one_line(
    content: str, server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path
) -> None:
    """A mirror answering 200 with an HTML page, or a corrupt .tar.gz (no checksum to catch either):
    exit 1 with one line naming the file and the fix, no traceback, nothing left behind."""
    data, _ = train_archive
    garbled = bytearray(data)
    garbled[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroes inside the deflate stream
    body = {"html_page": b"<!DOCTYPE html><html><body>Sign in to continue</body></html>\n"}
    server.files["/mirror/speech_commands_test_set_v0.01.tar.gz"] = body.get(content, bytes(garbled))
    args = ["dataset=test_v0.01", f"mirror={server.url('/mirror')}", f"paths.data_dir={tmp_path / 'data'}"]
    result = run_download(*args, "progress=false", cwd=tmp_path)
    print(f"\n{content}: exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "speech_commands_test_set_v0.01.tar.gz" in last
    assert "is not a readable tar archive" in last and "mirror=" in last
    assert looks_complete(tmp_path) == [] and list((tmp_path / "data").iterdir()) == []


def test_members_are_never_written_through_a_link(tmp_path: Path) -> None:
    """The last line of defence, for a link already there (none can come from an archive now): neither
    one on the way to a file nor one at its name is followed."""
    from kws_lightning.data.extract import write_member

    outside, folder = tmp_path / "outside", tmp_path / "folder"
    outside.mkdir()
    (folder / "no").mkdir(parents=True)
    (folder / "yes").symlink_to(outside)
    (folder / "no" / "a.wav").symlink_to(outside / "a.wav")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name in ("yes/a.wav", "no/a.wav"):
            member = tarfile.TarInfo(name)
            member.size = 3
            tar.addfile(member, io.BytesIO(b"abc"))
    with tarfile.open(tmp_path / "a.tar") as tar:
        for member in tar.getmembers():
            with pytest.raises(UnsafeArchiveError, match="would be written through a link"):
                write_member(tar, member, folder.resolve() / member.name)
    assert list(outside.iterdir()) == []


def test_a_repeated_file_is_unpacked_once_the_later_copy_wins(tmp_path: Path) -> None:
    """As tar does; and the unpacked folder gets the usual permissions, not the private temporary
    folder's 0700."""
    import os
    import stat

    again = tarfile.TarInfo("./yes/00000000_nohash_0.wav")
    tar_gz(official_test_tree(tmp_path / "tree"), tmp_path / "a.tar.gz", again, b"second copy")
    root = tmp_path / "root"
    result = ensure_dataset(spec_for((tmp_path / "a.tar.gz").as_uri(), None), root, progress=False)
    assert (root / "yes" / "00000000_nohash_0.wav").read_bytes() == b"second copy"
    assert result.marker["files"] == len(DEFAULT_KEYWORDS) + 2
    umask = os.umask(0o22)
    os.umask(umask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask


def test_second_call_is_a_no_op_without_any_request(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path
) -> None:
    data, sha = train_archive
    url = serve(server, data)
    root = tmp_path / "speech_commands_v0.02"
    ensure_dataset(spec_for(url, sha), root, progress=False)
    assert len(server.requests) == 1
    server.stop()  # any request now fails: the marker alone must answer
    started = time.perf_counter()
    again = ensure_dataset(spec_for(url, sha), root, progress=False)
    elapsed = time.perf_counter() - started
    print(f"\nsecond call: {elapsed * 1000:.2f} ms, no request")
    assert again.already_present and len(server.requests) == 1
    # A different archive asked into the same folder is an error, never a silent mix.
    with pytest.raises(ArchiveError, match="force=true"):
        ensure_dataset(spec_for(url, "1" * 64), root, progress=False)
    # A folder that lost files since its download is not taken as complete.
    (root / "LICENSE").unlink()
    with pytest.raises(ArchiveError, match="lacks 1 of the entries"):
        ensure_dataset(spec_for(url, sha), root, progress=False)


def test_two_processes_preparing_one_folder_download_it_once(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path
) -> None:
    """The lock beside the folder (DDP ranks on machines sharing a file system, two commands at once):
    one downloads, the other waits and then finds the marker."""
    from concurrent.futures import ThreadPoolExecutor

    data, sha = train_archive
    url = serve(server, data)
    root = tmp_path / "speech_commands_v0.02"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ensure_dataset(spec_for(url, sha), root, progress=False), range(2)))
    assert sorted(r.already_present for r in results) == [False, True]
    assert len(server.requests) == 1 and [p.name for p in tmp_path.iterdir()] == ["speech_commands_v0.02"]


def test_file_url_is_read_in_place_and_never_deleted(tmp_path: Path) -> None:
    tree = official_test_tree(tmp_path / "tree")
    archive = tmp_path / "speech_commands_test_set_v0.02.tar.gz"
    data = tar_gz(tree, archive)
    with pytest.raises(ChecksumMismatch):
        ensure_dataset(spec_for(archive.as_uri(), "2" * 64), tmp_path / "bad", progress=False)
    assert archive.read_bytes() == data and not (tmp_path / "bad").exists()
    result = ensure_dataset(spec_for(archive.as_uri(), None), tmp_path / "test_set", progress=False)
    assert result.marker["verified"] is False and result.marker["sha256"] == sha256_bytes(data)
    assert archive.is_file() and detect_layout(tmp_path / "test_set") == "test"


def test_existing_folder_not_made_here_is_never_replaced(tmp_path: Path) -> None:
    tree = official_test_tree(tmp_path / "tree")
    archive = tmp_path / "t.tar.gz"
    tar_gz(tree, archive)
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    for force in (False, True):
        with pytest.raises(ArchiveError, match="was not unpacked by this tool"):
            ensure_dataset(spec_for(archive.as_uri(), None), mine, force=force, progress=False)
    assert (mine / "notes").is_dir() and not (mine / MARKER_NAME).exists()
    # data.download=true / eval download=true: a folder unpacked by hand is used as it is, untouched.
    used = ensure_dataset(spec_for(archive.as_uri(), None), mine, accept_unmarked=True, progress=False)
    assert used.already_present and used.root == mine and [p.name for p in mine.iterdir()] == ["notes"]


def test_disk_full_is_one_clear_error(
    server: ArchiveServer, train_archive: tuple[bytes, str], tmp_path: Path
) -> None:
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    data, _ = train_archive
    url = serve(server, data)
    (tmp_path / "a.tar.gz.part").symlink_to("/dev/full")
    with pytest.raises(DownloadError, match="disk full writing"):
        fetch(url, tmp_path / "a.tar.gz", retries=0, progress=False)


def test_dns_failure_is_one_clear_error(tmp_path: Path) -> None:
    # .invalid never resolves (RFC 2606); without a network the resolver fails at once too.
    with pytest.raises(DownloadError, match="cannot resolve the host"):
        fetch("http://speech-commands.invalid/a.tar.gz", tmp_path / "a.tar.gz", retries=0, progress=False)


def test_registry_and_requests() -> None:
    v2 = resolve_archive("v0.02")
    assert v2.url == "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
    assert v2.sha256 == "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"
    assert resolve_archive("v0.01").sha256.startswith("743935421bb5")
    assert resolve_archive("test_v0.01").sha256 is None  # unverified: no published checksum
    assert v2.folder == "speech_commands_v0.02"
    mirrored = resolve_archive("test_v0.02", mirror="https://example.org/sc/")
    assert mirrored.url == "https://example.org/sc/speech_commands_test_set_v0.02.tar.gz"
    assert mirrored.sha256 == archives.DATASETS["test_v0.02"].sha256
    with pytest.raises(ArchiveRequestError, match="v0.01, v0.02, test_v0.01, test_v0.02"):
        resolve_archive("v3")
    with pytest.raises(ArchiveRequestError, match="64 hex digits"):
        resolve_archive("v0.02", sha256="abc")


# ---- the CLI, in real subprocesses ----------------------------------------------------------------------


def test_cli_mirror_success_then_no_op(server: ArchiveServer, tmp_path: Path) -> None:
    tree = official_test_tree(tmp_path / "tree")
    data = tar_gz(tree, tmp_path / "t.tar.gz")
    server.files["/mirror/speech_commands_test_set_v0.02.tar.gz"] = data
    common = [
        "dataset=test_v0.02",
        f"mirror={server.url('/mirror')}",
        f"sha256={sha256_bytes(data)}",
        f"paths.data_dir={tmp_path / 'data'}",
        "progress=false",
    ]
    first = run_download(*common, cwd=tmp_path)
    print(f"\n$ python -m kws_lightning.data.download {' '.join(common)}\n{first.stdout}{first.stderr}")
    assert first.returncode == 0, first.stderr
    root = tmp_path / "data" / "speech_commands_test_set_v0.02"
    assert f"{root}: ready" in first.stdout and (root / MARKER_NAME).is_file()
    assert server.requests == [("/mirror/speech_commands_test_set_v0.02.tar.gz", None)]
    second = run_download(*common, cwd=tmp_path)
    print(second.stdout)
    assert second.returncode == 0 and "already there" in second.stdout and len(server.requests) == 1


def test_cli_404_is_one_line_and_non_zero(server: ArchiveServer, tmp_path: Path) -> None:
    result = run_download(f"url={server.url('/data/missing.tar.gz')}", f"root={tmp_path / 'x'}", cwd=tmp_path)
    print(f"\n404: exit {result.returncode}: {result.stderr}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: http://127.0.0.1:")
    assert "not found (HTTP 404)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


# ---- other layouts and eval's shorthand ---------------------------------------------------------------


def test_torchaudio_layout_is_accepted_as_data_root(tmp_path: Path) -> None:
    inner = tmp_path / "ta" / "SpeechCommands" / "speech_commands_v0.02"
    speech_commands_tree(inner)
    for root in (tmp_path / "ta", tmp_path / "ta" / "SpeechCommands", inner):
        dataset = index_training_layout(root)
        assert dataset.root == inner.resolve() and dataset.split_source == "lists"
    assert detect_layout(tmp_path / "ta") == "training"
    make_training_tree(tmp_path / "ta" / "SpeechCommands" / "speech_commands_v0.01", {"yes": 2})
    with pytest.raises(DataLayoutError, match="2 Speech Commands versions"):
        index_training_layout(tmp_path / "ta")


def test_eval_input_test_set_shorthand(
    tiny_checkpoint: dict,
    server: ArchiveServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    run_cli: object,
) -> None:
    from test_eval import compose

    from kws_lightning.eval import evaluate

    assert resolve_test_set_input("/some/folder", tmp_path, download=False) == "/some/folder"
    missing = run_cli(
        "eval",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        "input=test_v0.02",
        f"paths.data_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert re.search(r"^error: input=test_v0.02: .*download=true.*dataset=test_v0.02", missing.stderr, re.M)

    data = tar_gz(official_test_tree(tmp_path / "tree"), tmp_path / "t.tar.gz")
    url = serve(server, data, "speech_commands_test_set_v0.02.tar.gz")
    fake = replace(archives.DATASETS["test_v0.02"], url=url, sha256=sha256_bytes(data), size=len(data))
    monkeypatch.setitem(archives.DATASETS, "test_v0.02", fake)
    metrics = evaluate(
        compose(
            "eval",
            f"ckpt_path={tiny_checkpoint['ckpt']}",
            "input=test_v0.02",
            "download=true",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'run'}",
        )
    )
    assert metrics["n_clips"] == len(DEFAULT_KEYWORDS) + 2
    assert str(tmp_path / "data" / "speech_commands_test_set_v0.02") in capsys.readouterr().out
    assert len(server.requests) == 1
