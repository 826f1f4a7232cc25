"""The ASGI app of `python -m kws_lightning.serve`: the page, /health, POST /predict and WS /stream.

Concurrency: one uvicorn process, one asyncio event loop that only parses, validates and sends. Work that
takes CPU runs off the loop: decoding an upload and driving a stream's `StreamingDetector` on a thread
pool (`feed_threads`), and every model call on the single model thread of `ModelWorker`, which batches
the windows of all concurrent requests into one call (eight live streams = one batch of eight windows a
hop). Each WebSocket has its own detector (the `RecognizeCommands` smoothing of `listen`) and a bounded
outbox drained by its own sender task: a client that reads slowly loses its oldest posterior messages
(detections are carried forward, never dropped), one that vanishes ends its own tasks; neither holds
up the model thread or the others. Uploads are refused by their declared size before a byte is read,
and counted while streaming in when no size is declared.

Only this service's own page (or one in `allowed_origins`) may use it: `serving.guard` checks every
request's Host and Origin. Uploads must declare an audio type (or multipart, octet-stream, none): a
`text/plain` POST, which any page can send without asking, is refused before its body is read.

Errors a client can cause answer 4xx JSON ``{"error": code, "detail": words}``; anything else is logged
and answers a 500 JSON without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from kws_lightning.data.audio_io import AudioReadError, decode_audio_bytes, resample, sample_rate_problem
from kws_lightning.listen import RecognizeCommands, StreamingDetector
from kws_lightning.serving.guard import RequestGuard, normalise_origin
from kws_lightning.serving.model_worker import ModelWorker, WorkerPredictor
from kws_lightning.serving.preview import LogMelPreview

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
RAW_TYPES = ("audio/l16", "audio/pcm", "audio/x-pcm16")
FORMATS = ("file", "pcm16")
# Content types an upload may declare, besides audio/*: what the page, curl -F and scripts send. The
# others a page may send cross-site without a preflight (text/plain, form-urlencoded) are refused.
UPLOAD_TYPES = ("", "application/octet-stream", "multipart/form-data")


@dataclass(frozen=True)
class ServeSettings:
    """The knobs of conf/serve.yaml the app reads; the detector's (as `listen` resolves them) come apart."""

    max_upload_s: float = 60.0
    max_upload_bytes: int = 32_000_000
    top_k: int = 3
    hop_ms: float = 100.0
    max_chunk_bytes: int = 320_000  # one WebSocket message: 10 s of PCM16
    outbox_messages: int = 50  # per connection; beyond, the oldest posterior message is dropped
    max_batch: int = 64
    feed_threads: int = 32
    host: str = "127.0.0.1"  # the bind address: a name the Host header may carry
    allowed_origins: tuple[str, ...] = ()  # pages besides the service's own that may use it

    def __post_init__(self) -> None:  # checked here, before the model loads: a typo is one clear line
        object.__setattr__(self, "allowed_origins", tuple(normalise_origin(o) for o in self.allowed_origins))


class ClientError(Exception):
    """A request the client can fix: becomes a 4xx JSON answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class HopRecorder:
    """Wraps a `RecognizeCommands`, keeping each hop's (time_ms, posteriors) for the client to draw."""

    def __init__(self, recognizer: RecognizeCommands) -> None:
        self.recognizer = recognizer
        self.seen: list[tuple[float, np.ndarray]] = []

    def process(self, time_ms: float, scores: np.ndarray) -> Any:
        self.seen.append((time_ms, np.asarray(scores)))
        return self.recognizer.process(time_ms, scores)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.recognizer, name)


class Outbox:
    """A bounded queue of JSON messages for one client; when full, the oldest message is dropped and its
    detections move into the newest, so a slow reader misses posterior frames but never a keyword."""

    def __init__(self, size: int) -> None:
        self.items: deque[dict[str, Any]] = deque()
        self.size = size
        self.ready = asyncio.Event()
        self.dropped = 0

    def put(self, message: dict[str, Any]) -> None:
        if len(self.items) >= self.size:
            old = self.items.popleft()
            self.dropped += 1
            if old.get("detections") and "detections" in message:
                message["detections"] = old["detections"] + message["detections"]
        self.items.append(message)
        self.ready.set()

    async def get(self) -> dict[str, Any]:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


def package_version() -> str:
    try:
        return version("kws-lightning")
    except PackageNotFoundError:
        return "unknown"


def model_name(predictor: Any) -> str:
    """The network's registry name, or the file's name for an exported model (its config is not stored)."""
    names = [
        str((c.get("model") or {}).get("name") or Path(p).name)
        for c, p in zip(predictor.configs, predictor.paths, strict=False)
    ]
    if not names:
        return Path(predictor.paths[0]).name if predictor.paths else "model"
    return names[0] if len(names) == 1 else f"ensemble of {len(names)}: {', '.join(names)}"


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def make_detector(predictor: WorkerPredictor, settings: ServeSettings, detector: Any) -> StreamingDetector:
    """One connection's detector: listen's window path, its model calls batched by the ModelWorker.
    (listen's incremental path keeps model state per stream, outside the shared model thread.)"""
    recorder = HopRecorder(detector.recognizer(predictor.labels))
    return StreamingDetector(predictor, recorder, settings.hop_ms, settings.max_batch)


def stream_message(
    detector: StreamingDetector, found: list[Any], preview: LogMelPreview | None, samples: np.ndarray
) -> dict[str, Any]:
    """What one chunk produced: each completed hop's posteriors, the detections, and log-mel frames."""
    seen = detector.recognizer.seen
    detector.recognizer.seen = []
    message: dict[str, Any] = {
        "type": "hops",
        "received_s": round(detector.total / detector.rate, 4),
        "times": [round(t / 1000.0, 4) for t, _ in seen],
        "posteriors": [[round(float(p), 5) for p in row] for _, row in seen],
        "detections": [asdict(d) for d in found],
    }
    if preview is not None:
        message["mel"] = preview.feed(samples)
    return message


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    main, *params = [p.strip() for p in value.split(";")]
    options = {}
    for param in params:
        key, _, val = param.partition("=")
        options[key.strip().lower()] = val.strip().strip('"')
    return main.lower(), options


async def read_bounded(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes: by Content-Length before reading, else
    while it streams in."""
    declared = request.headers.get("content-length")
    too_large = f"the upload is larger than max_upload_bytes={limit}; send a shorter clip"
    if declared is not None:
        if not declared.isdigit():
            raise ClientError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ClientError(413, "too_large", f"{too_large} (declared {declared} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, "too_large", too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_audio(request: Request, limit: int) -> tuple[bytes, str, str, dict[str, str]]:
    """(bytes, name, format, options) of an upload: a multipart form's first file, or the raw body."""
    content_type, options = parse_content_type(request.headers.get("content-type", ""))
    if not content_type.startswith("audio/") and content_type not in UPLOAD_TYPES:
        raise ClientError(
            415,
            "unsupported_type",
            f"Content-Type {content_type!r} is not audio: send the file as audio/wav (curl -H "
            "'Content-Type: audio/wav' --data-binary @clip.wav), application/octet-stream, or a form "
            "(curl -F file=@clip.wav)",
        )
    body = await read_bounded(request, limit)
    name = "the upload"
    if content_type == "multipart/form-data":

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as error:  # python-multipart's parse errors have no common base class
            raise ClientError(400, "bad_request", f"cannot parse the multipart form: {error}") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise ClientError(400, "empty", "the form holds no file: send it as -F file=@clip.wav")
        upload = files[0]
        body, name = await upload.read(), upload.filename or name
        content_type, options = parse_content_type(upload.content_type or "")
    fmt = request.query_params.get("format") or ("pcm16" if content_type in RAW_TYPES else "file")
    if fmt not in FORMATS:
        raise ClientError(
            400, "bad_format", f"format={fmt!r} is not a sample format this service reads; valid: {FORMATS}"
        )
    return body, name, fmt, {**options, **request.query_params}


def decode_upload(
    body: bytes, name: str, fmt: str, options: dict[str, str], rate: int, max_s: float
) -> tuple[np.ndarray, float]:
    """int16 mono samples at the model's `rate` and the upload's duration; ClientError for bad input."""
    if not body:
        raise ClientError(400, "empty", f"{name} is empty (0 bytes)")
    if fmt == "pcm16":
        try:
            source_rate, channels = int(options.get("rate", rate)), int(options.get("channels", 1))
        except ValueError:
            raise ClientError(400, "bad_format", "rate and channels must be integers") from None
        if channels <= 0:
            raise ClientError(400, "bad_format", "channels must be positive")
        rate_problem = sample_rate_problem(source_rate)
        if rate_problem is not None:  # before anything is sized by it
            raise ClientError(
                400, "bad_format", f"rate={source_rate}: {rate_problem}; send the audio's own rate"
            )
        if len(body) % (2 * channels):
            raise ClientError(
                400,
                "bad_format",
                f"{name} is not PCM16 with {channels} channel(s): {len(body)} bytes is not a whole number "
                f"of {2 * channels}-byte frames",
            )
        duration = len(body) / (2 * channels * source_rate)
        if duration > max_s:
            raise ClientError(413, "too_long", f"{name} lasts {duration:.1f} s; max_upload_s={max_s:g}")
        samples = np.frombuffer(body, "<i2").reshape(-1, channels).mean(axis=1) / 32768.0
        if source_rate != rate:
            samples = resample(samples, source_rate, rate)
        return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16), duration
    try:  # the header's length first: a 10-minute file is refused without decoding it
        import soundfile as sf

        info = sf.info(io.BytesIO(body))
        duration = info.frames / info.samplerate
    except Exception:
        duration = None  # decode_audio_bytes says what is wrong with it
    if duration is not None and duration > max_s:
        raise ClientError(413, "too_long", f"{name} lasts {duration:.1f} s; max_upload_s={max_s:g}")
    try:
        # Cropped before resampling past max_upload_s: the work stays bounded whatever the header said.
        decoded = decode_audio_bytes(body, name, rate, max_samples=int(max_s * rate) + 1)
    except AudioReadError as error:
        code = "empty" if "no samples" in error.reason else "not_audio"
        hint = "" if code == "empty" else "; send a WAV (or raw PCM16 with ?format=pcm16&rate=16000)"
        raise ClientError(400, code, f"{name}: {error.reason}{hint}") from None
    if decoded.note is not None:  # longer than its header said (or libsndfile could not read the header)
        raise ClientError(413, "too_long", f"{name} lasts more than max_upload_s={max_s:g} s")
    return decoded.samples, len(decoded.samples) / rate


def build_app(
    predictor: Any, settings: ServeSettings | None = None, detector_settings: Any = None
) -> Starlette:
    """The app serving `predictor` (a checkpoint's or an export's `Predictor`) with `detector_settings`
    (`stream_bench.settings.DetectorSettings`, as `listen` resolves them; None: TF's defaults)."""
    from kws_lightning.stream_bench.settings import DetectorSettings

    settings = settings or ServeSettings()
    smoothing = detector_settings or DetectorSettings()
    worker = ModelWorker(predictor, settings.max_batch)
    proxy = WorkerPredictor(worker)
    pool = ThreadPoolExecutor(settings.feed_threads, thread_name_prefix="kws-feed")
    labels = list(predictor.labels)
    rate = predictor.sample_rate
    health = {
        "status": "ok",
        "model": model_name(predictor),
        "sources": [Path(p).name for p in predictor.paths],  # names only: no path of this machine
        "classes": labels,
        "keywords": labels[2:],
        "sample_rate": rate,
        "clip_samples": predictor.clip_samples,
        "version": package_version(),
        "stream": {
            "input": f"binary messages of PCM16 little-endian mono at {rate} Hz",
            "hop_ms": settings.hop_ms,
            **smoothing.to_dict(),
        },
        "limits": {"max_upload_s": settings.max_upload_s, "max_upload_bytes": settings.max_upload_bytes},
    }

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def health_route(request: Request) -> JSONResponse:
        return JSONResponse({**health, "model_calls": worker.calls, "windows_scored": worker.windows})

    def score(samples: np.ndarray) -> dict[str, Any]:
        """On a pool thread: the centred clip as `predict` scores it, and a stream's detections if longer."""
        waves = torch.from_numpy(samples[None])
        views = predictor.views(waves, torch.tensor([len(samples)]))[0].numpy()
        probs = worker.posteriors(views)[0]
        order = np.argsort(-probs)[: max(1, settings.top_k)]
        result: dict[str, Any] = {
            "label": labels[int(order[0])],
            "score": float(probs[order[0]]),
            "posteriors": {label: float(p) for label, p in zip(labels, probs, strict=True)},
            "top_k": [{"label": labels[int(i)], "score": float(probs[i])} for i in order],
            "scored_s": min(len(samples), predictor.clip_samples) / rate,
            "detections": None,
        }
        if len(samples) > predictor.clip_samples:  # as `listen` on a file: the whole stream, then a flush
            detector = make_detector(proxy, settings, smoothing)
            found = detector.feed(samples) + detector.flush()
            result["detections"] = [asdict(d) for d in found]
            result["windows"] = detector.windows
            result["scored_s"] = len(samples) / rate
        return result

    async def predict_route(request: Request) -> JSONResponse:
        loop = asyncio.get_running_loop()
        try:
            body, name, fmt, options = await upload_audio(request, settings.max_upload_bytes)
            samples, duration = await loop.run_in_executor(
                pool, decode_upload, body, name, fmt, options, rate, settings.max_upload_s
            )
        except ClientError as error:
            return error_response(error.status, error.code, error.detail)
        result = await loop.run_in_executor(pool, score, samples)
        return JSONResponse({"duration_s": duration, "sample_rate": rate, **result})

    async def stream_route(websocket: WebSocket) -> None:
        await websocket.accept()
        loop = asyncio.get_running_loop()
        detector = make_detector(proxy, settings, smoothing)
        preview = LogMelPreview(rate) if websocket.query_params.get("mel") in ("1", "true") else None
        outbox = Outbox(settings.outbox_messages)
        outbox.put({"type": "ready", "classes": labels, "sample_rate": rate, "hop_ms": settings.hop_ms})

        async def send_loop() -> None:
            try:
                while True:
                    await websocket.send_text(json.dumps(await outbox.get()))
            except (WebSocketDisconnect, RuntimeError, OSError):  # the client is gone: the receiver ends too
                pass

        def feed(samples: np.ndarray) -> dict[str, Any]:
            return stream_message(detector, detector.feed(samples), preview, samples)

        def flush() -> dict[str, Any]:
            message = stream_message(detector, detector.flush(), None, np.zeros(0, np.int16))
            return {**message, "flushed": True}

        sender = asyncio.create_task(send_loop())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data, text = message.get("bytes"), message.get("text")
                if data is not None:
                    if len(data) > settings.max_chunk_bytes or len(data) % 2:
                        detail = (
                            f"a chunk of {len(data)} bytes: send PCM16 mono (an even number of bytes), "
                            f"at most max_chunk_bytes={settings.max_chunk_bytes} a message"
                        )
                        outbox.put({"type": "error", "error": "bad_format", "detail": detail})
                        continue
                    samples = np.frombuffer(data, "<i2")
                    outbox.put(await loop.run_in_executor(pool, feed, samples))
                elif text is not None:
                    try:
                        command = json.loads(text).get("type")
                    except (ValueError, AttributeError):
                        command = None
                    if command == "flush":
                        outbox.put(await loop.run_in_executor(pool, flush))
                    else:
                        detail = 'text messages are commands: {"type": "flush"}; audio goes in binary ones'
                        outbox.put({"type": "error", "error": "bad_command", "detail": detail})
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        worker.close()
        pool.shutdown(wait=False, cancel_futures=True)

    async def client_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, "http", str(error.detail))

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal", "the server failed on this request; see its log")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health_route),
            Route("/predict", predict_route, methods=["POST"]),
            WebSocketRoute("/stream", stream_route),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={HTTPException: client_error, Exception: server_error},
        middleware=[
            Middleware(RequestGuard, bind_host=settings.host, allowed_origins=settings.allowed_origins)
        ],
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app
