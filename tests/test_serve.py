"""The service end to end: a real server process on a free local port, a model trained in this session,
compared with what `predict` and `listen` say on the same files; bad uploads; WebSocket streams."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

pytest.importorskip("starlette", reason="the service needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (in the dev extra)")
ws_client = pytest.importorskip("websockets.sync.client", reason="the WebSocket tests need websockets")

from serve_helpers import confident_clips, detector_for, running_server, write_stream  # noqa: E402

from kws_lightning.data.audio_io import read_audio_int16  # noqa: E402
from kws_lightning.inference import Predictor  # noqa: E402

CHUNK_BYTES = 3200  # 100 ms of PCM16 at 16 kHz


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: dict, stream_wav: Path) -> dict:
    """listen's settings, with a threshold the tiny model reaches on the test stream."""
    return detector_for(Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu"), stream_wav)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: dict, detector: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    with running_server(tiny_checkpoint["ckpt"], tmp_path_factory.mktemp("serve"), detector) as url:
        yield url


@pytest.fixture(scope="module")
def clips(tiny_checkpoint: dict) -> list[tuple[Path, str, float]]:
    return confident_clips(tiny_checkpoint["ckpt"], tiny_checkpoint["data_root"], 6)


@pytest.fixture(scope="module")
def stream_wav(clips: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stream([c[0] for c in clips], tmp_path_factory.mktemp("stream") / "stream.wav")


@pytest.fixture(scope="module")
def listened(
    tiny_checkpoint: dict, stream_wav: Path, detector: dict, run_cli: object, tmp_path_factory
) -> pd.DataFrame:
    """`python -m kws_lightning.listen` on the stream, with the server's detector settings."""
    work = tmp_path_factory.mktemp("listen")
    out = work / "detections.csv"
    settings = [f"{key}={value}" for key, value in detector.items()]
    result = run_cli(
        "listen",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"input={stream_wav}",
        f"out={out}",
        "threads=1",
        *settings,
        f"hydra.run.dir={work / 'run'}",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    detections = pd.read_csv(out)
    assert len(detections) > 0, "the test needs a stream where listen detects something"
    return detections


def detections_of(items: list[dict]) -> list[tuple[float, str, float]]:
    return [(round(d["time_s"], 4), d["keyword"], round(d["score"], 3)) for d in items]


def listen_rows(frame: pd.DataFrame) -> list[tuple[float, str, float]]:
    return [
        (round(t, 4), k, round(s, 3)) for t, k, s in frame[["time_s", "keyword", "score"]].itertuples(False)
    ]


def test_health_describes_the_model(server: str, tiny_checkpoint: dict, detector: dict) -> None:
    health = httpx.get(f"{server}/health").json()
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    assert health["classes"] == predictor.labels and health["keywords"] == predictor.keywords
    assert health["sample_rate"] == 16000 and health["clip_samples"] == 16000
    assert health["model"] == predictor.configs[0]["model"]["name"]
    assert health["stream"]["detection_threshold"] == detector["detection_threshold"]
    page = httpx.get(server)
    assert page.status_code == 200 and "getUserMedia" not in page.text  # the logic is in app.js
    script = httpx.get(f"{server}/static/app.js").text
    assert "getUserMedia" in script and "/stream" in script
    assert "registerProcessor" in httpx.get(f"{server}/static/pcm-worklet.js").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith(("/static/", "data:")) for a in assets)  # no CDN


def test_predict_matches_the_predict_command(
    server: str, clips: list, tiny_checkpoint: dict, run_cli: object, tmp_path: Path
) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    for k, (path, _, _) in enumerate(clips[:4]):
        (folder / f"clip{k}.wav").write_bytes(path.read_bytes())
    # Any rate and channels: 22.05 kHz stereo float, decoded and resampled by the same code as predict.
    samples = read_audio_int16(clips[4][0]).astype(np.float32) / 32768
    sf.write(folder / "clip4.wav", np.stack([samples, samples], 1), 22050, subtype="FLOAT")
    out = tmp_path / "submission.csv"
    result = run_cli(
        "predict",
        f"ckpt_path={tiny_checkpoint['ckpt']}",
        f"input={folder}",
        f"out={out}",
        "probs=true",
        "device=cpu",
        "num_workers=0",
        "progress=false",
        "threads=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = pd.read_csv(out).set_index("fname")
    labels = list(expected.columns[1:])
    for k in range(5):
        name = f"clip{k}.wav"
        data = (folder / name).read_bytes()
        if k % 2:  # a multipart form, as curl -F file=@clip.wav sends it
            answer = httpx.post(f"{server}/predict", files={"file": (name, data, "audio/wav")})
        else:
            answer = httpx.post(f"{server}/predict", content=data, headers={"Content-Type": "audio/wav"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        got = np.array([body["posteriors"][label] for label in labels])
        np.testing.assert_allclose(got, expected.loc[name, labels].to_numpy(float), atol=1e-5)
        assert body["label"] == expected.loc[name, "label"] == body["top_k"][0]["label"]
        assert len(body["top_k"]) == 3 and body["detections"] is None
        assert body["duration_s"] == pytest.approx(sf.info(folder / name).duration, abs=1e-3)

    # Raw PCM16 at another rate: the same clip as PCM16 at 8 kHz must score like that 8 kHz WAV.
    eight = (samples[::2] * 32767).astype("<i2")
    sf.write(tmp_path / "eight.wav", eight, 8000, subtype="PCM_16")
    as_wav = httpx.post(f"{server}/predict", content=(tmp_path / "eight.wav").read_bytes()).json()
    raw = httpx.post(f"{server}/predict?format=pcm16&rate=8000", content=eight.tobytes()).json()
    assert raw["posteriors"] == pytest.approx(as_wav["posteriors"], abs=1e-6)


def test_predict_on_a_long_recording_returns_listen_detections(
    server: str, stream_wav: Path, listened: pd.DataFrame
) -> None:
    answer = httpx.post(f"{server}/predict", content=stream_wav.read_bytes())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["scored_s"] == pytest.approx(sf.info(stream_wav).duration, abs=1e-3)
    assert detections_of(body["detections"]) == listen_rows(listened)


def post_with_declared_length(url: str, declared: int, sent: bytes) -> tuple[int, dict]:
    """A request that declares `declared` body bytes but sends only `sent`: the answer must come anyway."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: audio/wav\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode() + sent)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_bad_uploads_answer_4xx_json_naming_the_problem(server: str, tmp_path: Path) -> None:
    def post(content: bytes, **options: str) -> tuple[int, dict]:
        answer = httpx.post(f"{server}/predict", content=content, params=options, timeout=60)
        return answer.status_code, answer.json()

    status, body = post(b"")
    assert (status, body["error"]) == (400, "empty") and "empty" in body["detail"]
    status, body = post(np.random.default_rng(0).bytes(20000))
    assert (status, body["error"]) == (400, "not_audio") and "not a readable audio file" in body["detail"]
    status, body = post(b"a text file, not audio\n" * 40)
    assert (status, body["error"]) == (400, "not_audio")
    ten_minutes = tmp_path / "ten_minutes.wav"
    sf.write(ten_minutes, np.zeros(600 * 16000, np.int16), 16000, subtype="PCM_16")
    status, body = post(ten_minutes.read_bytes())
    assert (status, body["error"]) == (413, "too_long") and "600.0 s" in body["detail"]
    assert "max_upload_s" in body["detail"]
    status, body = post(b"\x01\x02\x03", format="pcm16")
    assert (status, body["error"]) == (400, "bad_format") and "PCM16" in body["detail"]
    status, body = post(b"\x00\x00", format="float64")
    assert (status, body["error"]) == (400, "bad_format")
    # Refused by its declared size: the answer comes though only 1 kB of the 100 MB was sent.
    status, body = post_with_declared_length(server, 100_000_000, b"RIFF" + bytes(1020))
    assert (status, body["error"]) == (413, "too_large") and "max_upload_bytes" in body["detail"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # and the server is still fine


def test_sample_rates_outside_the_range_answer_400_at_once(server: str, tmp_path: Path) -> None:
    """A rate from a request or a header once went straight into the resampler: 4 bytes at 4,000,037 Hz
    took 18 s and 3.7 GB, 999,999,999 Hz a 500 (MemoryError)."""
    sf.write(tmp_path / "w.wav", np.zeros(4, np.int16), 16000, subtype="PCM_16")
    wav = bytearray((tmp_path / "w.wav").read_bytes())
    fmt = wav.index(b"fmt ") + 8
    wav[fmt + 4 : fmt + 12] = struct.pack("<II", 4_000_037, 8_000_074)
    started = time.monotonic()
    for rate in (4_000_037, 999_999_999, 999):
        answer = httpx.post(
            f"{server}/predict?format=pcm16&rate={rate}",
            content=bytes(4),
            headers={"Content-Type": "audio/L16"},
        )
        assert answer.status_code == 400 and f"rate={rate}" in answer.json()["detail"]
        assert "1000-384000 Hz" in answer.json()["detail"]
    answer = httpx.post(f"{server}/predict", content=bytes(wav), headers={"Content-Type": "audio/wav"})
    assert answer.status_code == 400 and "sample rate 4000037 Hz is outside" in answer.json()["detail"]
    assert time.monotonic() - started < 5


def test_only_the_services_own_page_may_use_it(server: str, tiny_checkpoint: dict) -> None:
    """Any page a browser shows may POST to 127.0.0.1 or open a WebSocket there: its Origin must be the
    service's own; a Host that is not this service's name is DNS rebinding; text/plain is not audio."""
    clip = (tiny_checkpoint["data_root"] / "testing_list.txt").read_text().split()[0]
    data = (tiny_checkpoint["data_root"] / clip).read_bytes()
    own, evil = server, "http://evil.example"

    def post(headers: dict) -> httpx.Response:
        return httpx.post(f"{server}/predict", content=data, headers={"Content-Type": "audio/wav", **headers})

    assert post({"Origin": own}).status_code == 200  # the page itself
    refused = post({"Origin": evil})
    assert refused.status_code == 403 and refused.json()["error"] == "bad_origin"
    assert "allowed_origins" in refused.json()["detail"]
    # A page on evil.example whose name now resolves to 127.0.0.1: same origin, but not our name.
    rebound = httpx.get(f"{server}/health", headers={"Host": f"evil.example:{urlparse(server).port}"})
    assert rebound.status_code == 400 and rebound.json()["error"] == "bad_host"
    assert httpx.get(f"{server}/health", headers={"Host": f"localhost:{urlparse(server).port}"}).is_success
    for kind in ("text/plain", "application/x-www-form-urlencoded"):  # sent cross-site without a preflight
        answer = post({"Content-Type": kind})
        assert answer.status_code == 415 and "audio/wav" in answer.json()["detail"]
    stream = server.replace("http://", "ws://") + "/stream"
    with pytest.raises(ws_client.InvalidStatus) as denied:
        ws_client.connect(stream, origin=evil, open_timeout=30)
    assert denied.value.response.status_code == 403
    with ws_client.connect(stream, origin=own, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
    health = httpx.get(f"{server}/health")
    assert health.json()["sources"] == [tiny_checkpoint["ckpt"].name]
    assert str(tiny_checkpoint["ckpt"].parent) not in health.text and '"/' not in health.text


def test_allowed_origins_widen_the_pages_and_names() -> None:
    """The guard's decisions with allowed_origins set (the server test above runs it in the real stack)."""
    from kws_lightning.serving.app import ServeSettings
    from kws_lightning.serving.guard import RequestGuard

    with pytest.raises(ValueError, match=r"allowed_origins entry 'localhost:3000' .* scheme://host\[:port\]"):
        ServeSettings(allowed_origins=["localhost:3000"])
    settings = ServeSettings(allowed_origins=["http://localhost:3000/", "https://KWS.example"])
    guard = RequestGuard(None, settings.host, settings.allowed_origins)

    def refused(origin: str | None, host: str = "127.0.0.1:8000") -> str | None:
        headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
        answer = guard.refusal(headers)
        return answer and answer[1]

    assert refused("http://localhost:3000") is None
    assert refused("https://kws.example", "kws.example") is None  # a proxy's name, from its origin
    assert refused("http://localhost:3001") == "bad_origin"
    assert refused("http://[::1]:8000", "[::1]:8000") is None  # the page itself, by any address
    assert refused(None, "other.example") == "bad_host"
    assert refused(None, "192.168.1.20:8000") is None  # host=0.0.0.0, opened by its LAN address


def stream_file(url: str, path: Path, chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Send a WAV's samples in 100 ms binary messages, then flush; every message the server sent."""
    samples = read_audio_int16(path).astype("<i2").tobytes()
    messages = []
    with ws_client.connect(url.replace("http://", "ws://") + "/stream?mel=1") as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        for first in range(0, len(samples), chunk_bytes):
            ws.send(samples[first : first + chunk_bytes])
        ws.send(json.dumps({"type": "flush"}))
        while True:
            message = json.loads(ws.recv(timeout=60))
            messages.append(message)
            if message.get("flushed"):
                return messages


def test_websocket_stream_gets_the_detections_listen_finds(
    server: str, stream_wav: Path, listened: pd.DataFrame
) -> None:
    messages = stream_file(server, stream_wav)
    assert all(m["type"] == "hops" for m in messages)
    detections = [d for m in messages for d in m["detections"]]
    assert detections_of(detections) == listen_rows(listened)
    times = [t for m in messages for t in m["times"]]
    np.testing.assert_allclose(np.diff(times), 0.1, atol=1e-6)  # a posterior row every hop
    rows = np.array([p for m in messages for p in m["posteriors"]])
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-3)
    mel = [frame for m in messages for frame in m.get("mel", [])]
    assert len(mel) == pytest.approx(sf.info(stream_wav).duration * 100, abs=3) and len(mel[0]) == 40


def test_concurrent_streams_and_misbehaving_clients(
    server: str, stream_wav: Path, listened: pd.DataFrame
) -> None:
    """Four streams at once each get listen's detections (one detector each) while one client never
    reads its answers and another vanishes mid-stream; bad messages get an error and keep the socket."""
    url = server.replace("http://", "ws://") + "/stream"
    samples = read_audio_int16(stream_wav).astype("<i2").tobytes()
    # max_queue=2: the client stops reading its socket after two messages; the server's sends then block.
    with ws_client.connect(url, max_queue=2) as silent:
        for first in range(0, len(samples), CHUNK_BYTES):
            silent.send(samples[first : first + CHUNK_BYTES])
        with contextlib.suppress(Exception), ws_client.connect(url) as vanishing:
            vanishing.send(samples[: 10 * CHUNK_BYTES])
            vanishing.socket.shutdown(socket.SHUT_RDWR)  # gone, without a closing handshake
        before = httpx.get(f"{server}/health").json()
        results: dict[int, list] = {}

        def run(k: int) -> None:
            results[k] = stream_file(server, stream_wav)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        expected = listen_rows(listened)
        for k in range(4):
            assert detections_of([d for m in results[k] for d in m["detections"]]) == expected
        with ws_client.connect(url) as ws:
            ws.recv(timeout=30)
            ws.send(b"\x01\x02\x03")
            error = json.loads(ws.recv(timeout=30))
            assert error["error"] == "bad_format" and "even number of bytes" in error["detail"]
            ws.send("hello")
            assert json.loads(ws.recv(timeout=30))["error"] == "bad_command"
            ws.send(samples[:CHUNK_BYTES])
            assert json.loads(ws.recv(timeout=30))["type"] == "hops"  # still streaming
    after = httpx.get(f"{server}/health").json()
    assert after["windows_scored"] - before["windows_scored"] >= 4 * len(times_of(results[0]))


def times_of(messages: list[dict]) -> list[float]:
    return [t for m in messages for t in m["times"]]


def test_serves_an_exported_model(tiny_checkpoint: dict, clips: list, tmp_path: Path) -> None:
    """model_path=model.pt: the TorchScript export answers as the checkpoint it came from."""
    from kws_lightning.export import export_checkpoint

    exported = export_checkpoint(str(tiny_checkpoint["ckpt"]), "torchscript", tmp_path / "model.pt")
    predictor = Predictor.from_checkpoints(tiny_checkpoint["ckpt"], "cpu")
    expected = predictor.predict_arrays([read_audio_int16(c[0]) for c in clips[:2]])
    settings = {"detection_threshold": 0.5}
    # A TorchScript file is code: served only with trust_code=true (refused without: tests/test_listen.py).
    model = (f"model_path={exported['path']}", "trust_code=true")
    with running_server(None, tmp_path / "serve", settings, *model) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["model"] == "model.pt" and health["classes"] == predictor.labels
        for (path, _, _), row in zip(clips[:2], expected, strict=True):
            body = httpx.post(f"{url}/predict", content=path.read_bytes()).json()
            got = np.array([body["posteriors"][label] for label in predictor.labels])
            np.testing.assert_allclose(got, row, atol=1e-5)
