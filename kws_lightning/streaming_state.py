"""Incremental streaming state for `listen`: each hop computes only what the new audio changes, with the
same posteriors as scoring the whole window (tests/test_streaming_state.py: to 1e-4).

Two levels, each exact:

* Front end (`IncrementalFrontend`, MFCC and log-mel): the STFT frames whose 480-sample span lies inside
  the window are the same for every window that holds them, so they are kept in a ring in stream
  coordinates and only the frames of the new hop are computed. The frames that touch the window's edges
  (the STFT's centre padding: 2 frames each side at n_fft 480 / hop 160) differ per window and are
  recomputed from the window's first / last 960 samples (the three slices go through one STFT call).
  What depends on the whole window is applied to
  the assembled window: log-mel's ``top_db`` floor (the window's peak) and the feature normalisation
  (``per_utterance`` statistics; ``dataset`` is per-frame anyway).
* Network (`NetState`, TC-ResNet and BC-ResNet): their time axis is 'same'-padded (not causal), so an
  activation is reusable only where its receptive field avoids the window's edges in both the window that
  computed it and the one that reuses it. Each layer's outputs are cached in stream coordinates; per hop,
  a layer computes only its head and tail (outputs whose receptive field touches the edges, or new
  frames) on a slice of its input wide enough to hold their receptive fields, and takes the middle from
  the cache (of the latest window whose offset is a multiple of the layer's cumulative stride). Layers
  whose receptive field is wider than the window (TC-ResNet's last blocks, BC-ResNet's last stage) are
  recomputed whole. This needs frame-local features: with ``per_utterance`` normalisation every feature
  moves with the window's statistics, and log-mel's ``top_db`` floor moves with its peak, so the cache is
  used only between windows whose floors leave the same features (equal peaks, or no bin floored in
  either); otherwise the network runs on the whole window (the front end stays incremental).

Models trained with causal padding (kws_streaming's streaming mode) would reuse nearly everything; ours are
trained 'same'-padded, which is what keeps streaming scores equal to clip scores. Other networks (DS-CNN's
TF-'SAME' asymmetric padding, ResNets with pooling, MatchboxNet) and the resampling log-spectrogram keep
the window path (DS-CNN still gets the incremental front end). benchmarks/streaming_hop.py measures the
saving: 18 % (TC-ResNet14) / 55 % (BC-ResNet-1) fewer convolution multiply-adds per hop, but no time
saved in eager PyTorch on a CPU (more, smaller calls), which is why `listen` defaults to incremental=false.
A layer reuses its cache only for at least `MIN_REUSE` of its outputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kws_lightning.features import MFCC, LogMel

INCREMENTAL_MODES = ("auto", "true", "false")
# A layer takes its middle from the cache only when that is at least this share of its outputs: computing
# the head and tail costs a call and two copies, which a small saving does not repay on a CPU.
MIN_REUSE = 0.25


def _frontend_unsupported(frontend: nn.Module, clip_samples: int, hop_samples: int) -> str | None:
    """Why the front end cannot run incrementally at this window / hop, or None when it can."""
    if not isinstance(frontend, MFCC | LogMel):
        return f"front end {type(frontend).__name__} (only MFCC and log-mel frames are computed per hop)"
    mel = frontend.mel
    if getattr(mel, "matmul_dft", False):
        return "the front end is in its export (matmul DFT) mode"
    if clip_samples % mel.hop_length or hop_samples % mel.hop_length:
        return (
            f"clip ({clip_samples}) and hop ({hop_samples} samples) must be multiples of the STFT hop "
            f"({mel.hop_length}) so frames line up between windows"
        )
    return None


class IncrementalFrontend:
    """Features (1, 1, T, F) of successive windows of one stream, computing only new interior frames.

    `raw` frames are the front end's per-frame values before anything that depends on the window (log-mel
    in dB before the ``top_db`` floor; MFCC before normalisation); `finish` applies the window-level steps.
    """

    def __init__(self, frontend: nn.Module, clip_samples: int) -> None:
        self.frontend = frontend
        self.mel = frontend.mel
        self.hop = self.mel.hop_length
        self.half = self.mel.n_fft // 2
        self.clip = clip_samples
        self.num_frames = 1 + clip_samples // self.hop
        # Frames whose span [t * hop - half, t * hop + half) leaves the window: they see its padding.
        self.edge_left = -(-self.half // self.hop)
        first_right = (clip_samples - self.half) // self.hop + 1
        self.edge_right = self.num_frames - first_right
        span = (max(self.edge_left, self.edge_right) + 1) * self.hop + self.mel.n_fft
        self.edge_samples = -(-span // self.hop) * self.hop  # whole frames, so the tail's frames line up
        self.frames: torch.Tensor | None = None  # raw interior frames (n, F)
        self.frames_start = 0  # stream frame index of frames[0]
        self.computed_frames = 0  # for the benchmark: STFT frames computed so far

    @property
    def frame_local(self) -> bool:
        """True when a frame's features do not depend on the rest of the window (no window statistics)."""
        if self.frontend.norm.mode == "per_utterance":
            return False
        return not (isinstance(self.frontend, LogMel) and self.frontend.top_db is not None)

    def raw(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, N) samples -> raw frames (B, T, F), T = 1 + N // hop (centre-padded like the front end)."""
        mel = self.mel(waves)
        self.computed_frames += mel.shape[0] * mel.shape[1]
        return self.frontend.frame_features(mel)

    def window_raw(self, window: torch.Tensor, start_sample: int) -> torch.Tensor:
        """Raw frames (T, F) of the window starting at stream sample `start_sample` (a multiple of hop)."""
        first, last = self.edge_left, self.num_frames - self.edge_right  # interior, window frames
        stream_first = start_sample // self.hop + first
        count = last - first
        cached = self.frames
        reuse = 0
        if cached is not None and self.frames_start <= stream_first < self.frames_start + len(cached):
            offset = stream_first - self.frames_start
            reuse = min(len(cached) - offset, count)
        # One STFT call per hop on three slices: the window's head and tail (their frames see its edge
        # padding) and the new interior frames [first + reuse, last). Zeros fill each slice to a common
        # length on its side away from the frames taken, a whole number of hops, so frames still line up.
        start = (first + reuse - self.edge_left) * self.hop
        stop = (last - 1) * self.hop + self.half
        length = -(-max(stop - start, self.edge_samples) // self.hop) * self.hop
        pad = nn.functional.pad
        chunks = [
            pad(window[: self.edge_samples], (0, length - self.edge_samples)),
            pad(window[-self.edge_samples :], (length - self.edge_samples, 0)),
        ]
        if reuse < count:
            chunks.append(pad(window[start:stop], (0, length - (stop - start))))
        raw = self.raw(torch.stack(chunks))
        parts = [cached[offset : offset + reuse]] if reuse else []
        if reuse < count:
            parts.append(raw[2, self.edge_left : self.edge_left + count - reuse])
        middle = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.frames, self.frames_start = middle, stream_first
        return torch.cat([raw[0, : self.edge_left], middle, raw[1, -self.edge_right :]])

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """Window-level steps on raw frames (T, F) -> features (1, 1, T, F), as the front end ends."""
        return self.frontend.window_features(raw[None])

    def same_features(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether two windows' (peak, minimum) raw dB give the same features on the frames they share."""
        if self.frame_local:
            return True
        if self.frontend.norm.mode == "per_utterance":
            return False
        floor = max(a[0], b[0]) - self.frontend.top_db
        return a[0] == b[0] or min(a[1], b[1]) >= floor


@dataclass
class TimeStage:
    """A layer (or block) along the time axis: output j sees inputs j * stride +- radius (its own units)."""

    module: nn.Module
    stride: int
    radius: int


@dataclass
class NetPlan:
    """A network cut into time stages: `prepare` (features -> tensor with time on `time_dim`), the stages,
    and `finish` (last stage's output -> logits)."""

    prepare: Callable[[torch.Tensor], torch.Tensor]
    stages: list[TimeStage]
    time_dim: int
    finish: Callable[[torch.Tensor], torch.Tensor]


def _tc_resnet_plan(net: nn.Module) -> NetPlan | None:
    from kws_lightning.models.tc_resnet import TCResNet

    if not isinstance(net, TCResNet):
        return None
    stem_conv = net.stem[0]
    stages = [TimeStage(net.stem, 1, stem_conv.padding[0])]
    for block in net.blocks:
        conv1, conv2 = block.body[0], block.body[3]
        stride = conv1.stride[0]
        # 'same' symmetric padding: conv1 at stride s, conv2 at stride 1 on the block's output.
        stages.append(TimeStage(block, stride, conv1.padding[0] + conv2.padding[0] * stride))

    def finish(x: torch.Tensor) -> torch.Tensor:
        return net.classifier(net.dropout(x.mean(dim=2)))

    return NetPlan(lambda x: x.permute(0, 1, 3, 2).flatten(1, 2), stages, 2, finish)


def _bc_resnet_plan(net: nn.Module) -> NetPlan | None:
    from kws_lightning.models.bc_resnet import BCResNet

    if not isinstance(net, BCResNet):
        return None
    head_conv = net.head[0]
    stages = [TimeStage(net.head, head_conv.stride[1], head_conv.padding[1])]
    for block in net.blocks:
        stages.append(TimeStage(block, 1, block.f1[0].padding[1]))  # the dilated (1, 3) time conv
    # dw 5x5 conv (time padding 2), 1x1 conv, BN, ReLU; then pooling over time and the output conv.
    stages.append(TimeStage(net.classifier[:4], 1, net.classifier[0].padding[1]))

    def finish(x: torch.Tensor) -> torch.Tensor:
        return net.classifier[4:](x).flatten(1)

    return NetPlan(lambda x: x.transpose(2, 3), stages, 3, finish)


PLANS = (_tc_resnet_plan, _bc_resnet_plan)


def net_plan(net: nn.Module) -> NetPlan | None:
    """The time-stage plan of a network that can reuse activations between windows, or None."""
    for build in PLANS:
        plan = build(net)
        if plan is not None:
            return plan
    return None


@dataclass
class _Entry:
    frame: int  # stream frame of the window's frame 0
    key: tuple[float, float]  # (peak, minimum) of the window's raw frames
    levels: list[torch.Tensor] = field(default_factory=list)


class NetState:
    """Per-stage activations of recent windows, in stream coordinates; see the module docstring."""

    def __init__(self, plan: NetPlan, frontend: IncrementalFrontend, hop_frames: int) -> None:
        self.plan = plan
        self.frontend = frontend
        num = frontend.num_frames
        # Per stage output: cumulative stride, receptive radius (in frames) and the "clean" output range
        # whose receptive field avoids the edge frames of the window.
        self.strides, self.radii, self.clean = [], [], []
        stride, radius = 1, 0
        for stage in plan.stages:
            radius += stage.radius * stride
            stride *= stage.stride
            lo = -(-(frontend.edge_left + radius) // stride)
            hi = (num - 1 - frontend.edge_right - radius) // stride + 1
            self.strides.append(stride)
            self.radii.append(radius)
            self.clean.append((lo, hi))
        keep = 1
        while (keep * hop_frames) % stride:
            keep += 1
        self.history: deque[_Entry] = deque(maxlen=keep)
        self.computed = [0] * len(plan.stages)  # outputs computed per stage (the benchmark reads them)
        self.reused = [0] * len(plan.stages)

    def _ends(
        self, stage: TimeStage, x: torch.Tensor, first: int, last: int, size: int
    ) -> list[torch.Tensor]:
        """Outputs [0, first) and [last, size) of `stage` in one call, from the inputs their receptive
        fields need: the head slice (from the window's start) and the tail slice (to its end) stacked along
        the batch, each filled with zeros on the side away from the outputs taken (the tail's filling a
        whole number of strides, so its outputs stay aligned)."""
        dim, s, n = self.plan.time_dim, stage.stride, x.shape[self.plan.time_dim]
        head_hi = min(n, (first - 1) * s + stage.radius + 1)
        tail_lo = max(0, last * s - stage.radius) // s * s
        width = max(head_hi, n - tail_lo)
        fill = -(-(width - (n - tail_lo)) // s) * s
        width = n - tail_lo + fill
        head = x.narrow(dim, 0, head_hi)
        tail = x.narrow(dim, tail_lo, n - tail_lo)
        zeros = [0] * (2 * (x.dim() - 1 - dim))  # F.pad counts from the last dimension
        head = nn.functional.pad(head, (*zeros, 0, width - head_hi))
        tail = nn.functional.pad(tail, (*zeros, fill, 0))
        out = stage.module(torch.cat([head, tail]))
        start = last - (tail_lo - fill) // s
        return [out[:1].narrow(dim, 0, first), out[1:].narrow(dim, start, size - last)]

    def logits(self, features: torch.Tensor, frame: int, key: tuple[float, float]) -> torch.Tensor:
        dim = self.plan.time_dim
        x = self.plan.prepare(features)
        entry = _Entry(frame, key)
        sources = [e for e in reversed(self.history) if self.frontend.same_features(e.key, key)]
        for index, stage in enumerate(self.plan.stages):
            size = -(-x.shape[dim] // stage.stride)
            stride, (clean_lo, clean_hi) = self.strides[index], self.clean[index]
            first = last = 0
            for source in sources:  # the latest window whose outputs line up with ours
                shift, rest = divmod(frame - source.frame, stride)
                if rest == 0 and 0 <= shift:
                    first, last = clean_lo, min(clean_hi, clean_hi - shift)
                    if first < last:
                        reused = source.levels[index].narrow(dim, first + shift, last - first)
                    break
            # Reuse pays only for a good share of the outputs: else one call on the whole window is faster.
            if last - first >= max(1, MIN_REUSE * size) and first > 0 and last < size:
                head, tail = self._ends(stage, x, first, last, size)
                x = torch.cat([head, reused, tail], dim=dim)
                self.reused[index] += last - first
                self.computed[index] += size - (last - first)
            else:
                x = stage.module(x)
                self.computed[index] += size
            entry.levels.append(x)
        self.history.append(entry)
        return self.plan.finish(x)


class IncrementalScorer:
    """Posteriors of successive windows of one stream for one `KWSModel`, front end incremental and, for
    the networks in `PLANS` with frame-local features, the network too."""

    def __init__(self, model: nn.Module, clip_samples: int, hop_samples: int, net: bool = True) -> None:
        reason = _frontend_unsupported(model.frontend, clip_samples, hop_samples)
        if reason:
            raise ValueError(f"incremental streaming is not possible: {reason}")
        self.model = model
        self.frontend = IncrementalFrontend(model.frontend, clip_samples)
        plan = net_plan(model.net) if net else None
        if plan is not None and model.frontend.norm.mode == "per_utterance":
            plan = None  # every feature moves with the window's statistics: nothing to reuse
        hop_frames = hop_samples // self.frontend.hop
        self.net = NetState(plan, self.frontend, hop_frames) if plan is not None else None

    @torch.inference_mode()
    def logits(self, window: torch.Tensor, start_sample: int) -> torch.Tensor:
        """Logits (1, classes) of the window (clip_samples,) starting at stream sample `start_sample`."""
        window = window.to(self.frontend.mel.window.device, torch.float32)
        raw = self.frontend.window_raw(window, start_sample)
        features = self.frontend.finish(raw)
        if self.net is None:
            return self.model.net(features)
        key = (float(raw.max()), float(raw.min()))
        return self.net.logits(features, start_sample // self.frontend.hop, key)


def unsupported_reason(model: nn.Module, clip_samples: int, hop_samples: int) -> str | None:
    """Why `model` cannot be streamed incrementally (None: it can, at least its front end)."""
    frontend = getattr(model, "frontend", None)
    if frontend is None or not hasattr(model, "net"):
        return f"{type(model).__name__} is not a KWSModel (an exported model runs whole windows)"
    return _frontend_unsupported(frontend, clip_samples, hop_samples)


class IncrementalPredictor:
    """Posteriors (1, classes) per window for a `Predictor` (an ensemble averages its models)."""

    def __init__(self, models: list[nn.Module], clip_samples: int, hop_samples: int) -> None:
        self.scorers = [IncrementalScorer(m, clip_samples, hop_samples) for m in models]

    def posteriors(self, window: torch.Tensor, start_sample: int) -> torch.Tensor:
        total = torch.softmax(self.scorers[0].logits(window, start_sample), dim=-1)
        for scorer in self.scorers[1:]:
            total = total + torch.softmax(scorer.logits(window, start_sample), dim=-1)
        return (total / len(self.scorers)).cpu()


def build_incremental(
    predictor: object, hop_samples: int, mode: str | bool = "auto"
) -> IncrementalPredictor | None:
    """The incremental path for `listen`'s `incremental` setting: auto (when the model allows it), true
    (an error naming why not), false (None: the window path)."""
    mode = str(mode).lower()
    if mode not in INCREMENTAL_MODES:
        raise ValueError(f"incremental={mode!r} unknown; valid: {list(INCREMENTAL_MODES)}")
    if mode == "false":
        return None
    models = getattr(predictor, "models", [])
    reasons = [unsupported_reason(m, predictor.clip_samples, hop_samples) for m in models] or ["no model"]
    reason = next((r for r in reasons if r), None)
    if reason:
        if mode == "true":
            raise ValueError(f"incremental=true: {reason}; use incremental=auto or false for the window path")
        return None
    return IncrementalPredictor(models, predictor.clip_samples, hop_samples)
