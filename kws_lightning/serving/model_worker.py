"""One model thread that batches the windows of every concurrent request into shared model calls.

Requests (an HTTP upload's windows, a WebSocket's new hops) put float windows on a queue and wait on a
future; the thread takes everything queued (up to `max_batch` windows), runs the model once, and hands
each request its rows. Under load, eight streams asking for one window each cost one batch of eight, not
eight calls; the model and torch's threads are used from this thread only, so nothing needs a lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

import numpy as np
import torch

from kws_lightning.inference import Predictor

log = logging.getLogger(__name__)


class ModelWorker:
    """Runs `predictor.posteriors` on a single thread, batching windows across callers."""

    def __init__(self, predictor: Predictor, max_batch: int = 64) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.jobs: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self.calls = 0  # model calls so far (a test reads it to see batching happen)
        self.windows = 0
        self.thread = threading.Thread(target=self._loop, name="kws-model", daemon=True)
        self.thread.start()

    def submit(self, windows: np.ndarray) -> Future:
        """Float32 windows (B, clip_samples) -> a future of their posteriors (B, classes)."""
        future: Future = Future()
        windows = np.ascontiguousarray(windows, np.float32)
        if len(windows) == 0:
            future.set_result(np.zeros((0, len(self.predictor.labels)), np.float32))
        else:
            self.jobs.put((windows, future))
        return future

    def posteriors(self, windows: np.ndarray) -> np.ndarray:
        """Blocking `submit` (for code running on a worker thread, never on the event loop)."""
        return self.submit(windows).result()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            size = len(job[0])
            while size < self.max_batch:  # take whatever else is already waiting
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)
                    break
                batch.append(more)
                size += len(more[0])
            self._run(batch)

    def _run(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        try:
            waves = torch.from_numpy(np.concatenate([w for w, _ in batch]))
            probs = self.predictor.posteriors(waves).cpu().numpy()
        except Exception as error:  # one bad call must not kill the thread that serves everyone
            log.exception("model call failed")
            for _, future in batch:
                future.set_exception(error)
            return
        self.calls += 1
        self.windows += len(probs)
        first = 0
        for windows, future in batch:
            future.set_result(probs[first : first + len(windows)])
            first += len(windows)


class WorkerPredictor:
    """What `listen.StreamingDetector` needs of a predictor, with the model calls sent to a ModelWorker."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker
        self.labels = worker.predictor.labels
        self.sample_rate = worker.predictor.sample_rate
        self.clip_samples = worker.predictor.clip_samples

    def posteriors(self, waves: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.worker.posteriors(waves.numpy()))
