"""Load on `python -m kws_lightning.serve`: N concurrent WebSocket streams at real-time pace.

Each stream sends PCM16 from local audio files (looped) in 100 ms messages, one every 100 ms, for
`--seconds`, as the page does with a microphone. Latency per hop = from sending a message to receiving
the server's answer for it (its posteriors, detections and log-mel frames). Prints one figure per line
(``name value unit``): p50 / p99 / max latency, errors (failed connections, error messages, answers
missing at the end), the windows scored and how many windows a model call batched on average.

The server is started here on a free port (`--ckpt` or `--model-path`, `--threads` torch threads), or
an already running one is used (`--url`).

    python benchmarks/serve_load.py --ckpt CKPT [--streams 8] [--seconds 30] [--input DIR_OR_WAV ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

import numpy as np

from kws_lightning.data.audio_io import AudioReadError, read_audio_int16

DEV_DATA = Path(__file__).resolve().parents[2] / "shared/data/speech_commands_dev"
HOP_S = 0.1


def load_audio(inputs: list[str], limit: int = 200) -> np.ndarray:
    """Up to `limit` files (folders searched for .wav) as one int16 stream at 16 kHz; noise if none."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        files += sorted(path.rglob("*.wav"))[:limit] if path.is_dir() else [path]
    clips = []
    for file in files[:limit]:
        try:
            clips.append(read_audio_int16(file))
        except AudioReadError as error:
            print(f"skipped: {error}", file=sys.stderr)
    if not clips:
        print("no audio files given or found: streaming noise", file=sys.stderr)
        return (np.random.default_rng(0).normal(0, 0.05, 16000 * 30) * 32767).astype(np.int16)
    return np.concatenate(clips)


def start_server(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str]:
    source = f"model_path={args.model_path}" if args.model_path else f"ckpt_path={args.ckpt}"
    command = [
        sys.executable,
        "-m",
        "kws_lightning.serve",
        source,
        "port=0",
        f"paths.log_dir={work}",
        f"hydra.run.dir={work / 'run'}",
        "log_level=warning",
    ]
    if args.threads:
        command.append(f"threads={args.threads}")
    out = open(work / "serve.out", "w")  # noqa: SIM115 - the server outlives this function
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"on (http://[\d.]+:\d+)", (work / "serve.out").read_text())
        if found:
            url = found.group(1)
            for _ in range(100):  # the line is printed just before uvicorn starts accepting
                try:
                    urlopen(f"{url}/health", timeout=2).read()
                    return process, url
                except OSError:
                    time.sleep(0.1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start:\n{(work / 'serve.out').read_text()[-3000:]}")


async def one_stream(url: str, audio: np.ndarray, offset: int, seconds: float, stats: dict) -> None:
    import websockets

    chunk = int(16000 * HOP_S)
    sent: dict[float, float] = {}  # received_s of the answer -> when its message was sent
    try:
        async with websockets.connect(url.replace("http", "ws", 1) + "/stream?mel=1") as ws:
            json.loads(await ws.recv())  # ready

            async def receive() -> None:
                async for raw in ws:
                    message = json.loads(raw)
                    if message.get("type") == "error":
                        stats["errors"] += 1
                        continue
                    at = sent.pop(message["received_s"], None)
                    if at is not None:
                        stats["latency"].append(time.perf_counter() - at)

            reader = asyncio.create_task(receive())
            start = time.perf_counter()
            position = offset
            for hop in range(int(seconds / HOP_S)):
                await asyncio.sleep(max(0.0, start + hop * HOP_S - time.perf_counter()))  # real time
                piece = np.take(audio, np.arange(position, position + chunk), mode="wrap")
                position += chunk
                sent[round((hop + 1) * chunk / 16000, 4)] = time.perf_counter()
                await ws.send(piece.astype("<i2").tobytes())
            await asyncio.sleep(1.0)  # the last answers
            reader.cancel()
            stats["missing"] += len(sent)
            stats["hops"] += int(seconds / HOP_S)
    except (OSError, websockets.WebSocketException) as error:
        stats["errors"] += 1
        print(f"stream failed: {error!r}", file=sys.stderr)


async def run_load(url: str, audio: np.ndarray, streams: int, seconds: float) -> dict:
    stats = {"latency": [], "errors": 0, "missing": 0, "hops": 0}
    spacing = len(audio) // max(streams, 1)
    tasks = []
    for k in range(streams):
        tasks.append(one_stream(url, audio, k * spacing, seconds, stats))
    await asyncio.gather(*tasks)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="checkpoint to serve (started here)")
    parser.add_argument("--model-path", help="exported .onnx / .pt to serve instead")
    parser.add_argument("--url", help="use a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    default_input = [str(DEV_DATA / w) for w in ("yes", "no", "up", "down")] if DEV_DATA.is_dir() else []
    parser.add_argument("--input", nargs="*", default=default_input, help="WAV files or folders")
    args = parser.parse_args()
    if not (args.url or args.ckpt or args.model_path):
        parser.error("give --ckpt, --model-path or --url")

    audio = load_audio(args.input)
    process = None
    with tempfile.TemporaryDirectory() as work:
        url = args.url
        if url is None:
            process, url = start_server(args, Path(work))
        try:
            before = json.loads(urlopen(f"{url}/health").read())
            stats = asyncio.run(run_load(url, audio, args.streams, args.seconds))
            after = json.loads(urlopen(f"{url}/health").read())
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=10)
    latency_ms = 1000.0 * np.array(stats["latency"] or [np.nan])
    windows = after["windows_scored"] - before["windows_scored"]
    calls = max(after["model_calls"] - before["model_calls"], 1)
    print(f"model {after['model']}")
    print(f"cpu_cores {os.cpu_count()} count")
    print(f"streams {args.streams} count")
    print(f"seconds {args.seconds:g} s")
    print(f"hops_sent {stats['hops']} count")
    print(f"latency_p50 {np.percentile(latency_ms, 50):.1f} ms")
    print(f"latency_p99 {np.percentile(latency_ms, 99):.1f} ms")
    print(f"latency_max {latency_ms.max():.1f} ms")
    print(f"errors {stats['errors']} count")
    print(f"missing_answers {stats['missing']} count")
    print(f"windows_scored {windows} count")
    print(f"windows_per_model_call {windows / calls:.2f} windows")


if __name__ == "__main__":
    main()
