"""Incremental streaming (kws_lightning/streaming_state.py): the same posteriors as scoring each whole
window, per front end / normalisation / network family, real reuse of frames and activations, and the
fallback for models that cannot stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kws_lightning.features import MFCC, LogMel, LogSpectrogram
from kws_lightning.inference import Predictor
from kws_lightning.listen import RecognizeCommands, StreamingDetector
from kws_lightning.models import build_model
from kws_lightning.models.kws_model import KWSModel
from kws_lightning.streaming_state import IncrementalScorer, build_incremental

LABELS = ["silence", "unknown", "yes", "no", "up"]
CLIP = 16000
HOP = 1600


def stream(seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """Digital silence, noise of changing gain, tones, chirps and clicks: a stream with no easy symmetry."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    x = rng.standard_normal(n) * np.repeat(10 ** rng.uniform(-3.5, -1, n // 4000 + 1), 4000)[:n]
    x += 0.3 * np.sin(2 * np.pi * (300 + 900 * t) * t) * (np.sin(2 * np.pi * 0.7 * t) > 0.3)
    x[::1777] += 0.6
    x[:6000] = 0.0  # starts in digital silence: log-mel's top_db floor is active in the first windows
    return np.clip(x, -1, 1).astype(np.float32)


def model(frontend: torch.nn.Module, name: str, **hparams: object) -> KWSModel:
    """A randomly initialised KWSModel with non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(0)
    net = build_model(name, (1, 101, 40), len(LABELS), **hparams)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    full = KWSModel(frontend, net).eval()
    if frontend.norm.mode == "dataset":
        frontend.norm.set_statistics(torch.linspace(-5, 5, 40), torch.linspace(1, 3, 40))
    return full


def windows(audio: np.ndarray) -> list[tuple[torch.Tensor, int]]:
    """(window, stream start) every hop, the stream padded with a clip of digital silence on the left."""
    padded = torch.from_numpy(np.concatenate([np.zeros(CLIP, np.float32), audio]))
    return [(padded[end : end + CLIP], end - CLIP) for end in range(HOP, len(audio) + 1, HOP)]


CASES = {
    "tc_resnet14/mfcc/none": (lambda: MFCC(), "tc_resnet14", {}, True),
    "tc_resnet14-1.5/mfcc/dataset": (
        lambda: MFCC(normalize="dataset"),
        "tc_resnet14",
        {"width_multiplier": 1.5},
        True,
    ),
    "tc_resnet8/mfcc/per_utterance": (lambda: MFCC(normalize="per_utterance"), "tc_resnet8", {}, False),
    "bc_resnet/logmel_top_db/none": (lambda: LogMel(), "bc_resnet", {}, True),
    "bc_resnet/logmel_no_floor/none": (lambda: LogMel(top_db=None), "bc_resnet", {}, True),
    "bc_resnet/logmel/per_utterance": (lambda: LogMel(normalize="per_utterance"), "bc_resnet", {}, False),
    "ds_cnn/mfcc_reflect/none (front end only)": (lambda: MFCC(pad_mode="reflect"), "ds_cnn", {}, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incremental_posteriors_equal_the_window_path(case: str) -> None:
    make_frontend, name, hparams, network_reuse = CASES[case]
    kws = model(make_frontend(), name, **hparams)
    scorer = IncrementalScorer(kws, CLIP, HOP)
    diffs = []
    with torch.inference_mode():
        for window, start in windows(stream()):
            expected = torch.softmax(kws(window[None]), dim=-1)
            got = torch.softmax(scorer.logits(window, start), dim=-1)
            diffs.append(float((got - expected).abs().max()))
    assert max(diffs) < 1e-4, f"{case}: max |posterior diff| {max(diffs):.2e}"
    # Per window after the first, one STFT call on 3 slices of 14 hops (15 frames each: the hop's 10 new
    # frames, and the window's head and tail), against 101 frames for the window path (the first window:
    # 3 slices of the whole window).
    assert scorer.frontend.computed_frames <= (len(diffs) - 1) * 3 * 15 + 3 * 101
    if network_reuse:
        assert scorer.net is not None and sum(scorer.net.reused) > 0, "no activation was reused"
        first_stage = scorer.net.reused[0] / (scorer.net.reused[0] + scorer.net.computed[0])
        assert first_stage > 0.5, f"the first layer reused only {first_stage:.0%} of its outputs"
    elif scorer.net is not None:
        assert sum(scorer.net.reused) == 0


class Recorder(RecognizeCommands):
    """RecognizeCommands that keeps every (time, posteriors) it is given."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__(labels)
        self.seen: list[tuple[float, np.ndarray]] = []

    def process(self, time_ms: float, scores: np.ndarray) -> object:
        self.seen.append((time_ms, np.asarray(scores)))
        return super().process(time_ms, scores)


def test_detector_gives_the_same_posteriors_incremental_or_not() -> None:
    kws = model(LogMel(), "bc_resnet")
    predictor = Predictor([kws], LABELS, 16000, CLIP)
    audio = stream(3.0, seed=1)
    scores = {}
    for mode in ("true", "false"):
        recorder = Recorder(LABELS)
        detector = StreamingDetector(predictor, recorder, 100, batch_size=7, incremental=mode)
        assert (detector.incremental is not None) == (mode == "true")
        for first in range(0, len(audio), 2500):  # chunks that do not line up with the hop
            detector.feed(audio[first : first + 2500])
        detector.flush()
        scores[mode] = recorder.seen
    assert [t for t, _ in scores["true"]] == [t for t, _ in scores["false"]]
    diff = max(np.abs(a - b).max() for (_, a), (_, b) in zip(scores["true"], scores["false"], strict=True))
    assert diff < 1e-4


def test_models_that_cannot_stream_keep_the_window_path() -> None:
    kws = model(LogSpectrogram(), "ds_cnn")  # resampled over the whole clip: no per-frame features
    kws.net = build_model("ds_cnn", (1, 99, 81), len(LABELS)).eval()
    predictor = Predictor([kws], LABELS, 16000, CLIP)
    assert build_incremental(predictor, HOP, "auto") is None
    with pytest.raises(ValueError, match="LogSpectrogram"):
        build_incremental(predictor, HOP, "true")
    detector = StreamingDetector(predictor, RecognizeCommands(LABELS), 100, incremental="auto")
    assert detector.incremental is None
    # A hop that is not a whole number of STFT frames cannot reuse frames either.
    mfcc = Predictor([model(MFCC(), "tc_resnet8")], LABELS, 16000, CLIP)
    assert build_incremental(mfcc, 1000, "auto") is None
    with pytest.raises(ValueError, match="multiples of the STFT hop"):
        build_incremental(mfcc, 1000, True)
    with pytest.raises(ValueError, match="incremental='maybe' unknown"):
        build_incremental(mfcc, HOP, "maybe")
