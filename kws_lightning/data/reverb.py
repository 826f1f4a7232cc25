"""Room reverberation from synthetic impulse responses (training only; off by default).

No recorded room impulse responses can be downloaded on the machines this project runs on, so each one is
drawn: the direct path (one sample of gain 1 at lag 0) followed by a diffuse tail of Gaussian noise whose
amplitude falls by 60 dB over the room's reverberation time RT60 (Polack's statistical model, the one
behind most synthetic-RIR augmentation, e.g. Kaldi's and Lhotse's), scaled so that the direct-to-
reverberant energy ratio (DRR) is a drawn value. The convolution keeps the direct path in place (the word
does not move) and the output is scaled back to the input's energy (the level does not jump).

Applied per batch on the training device by one FFT convolution: no per-clip Python.
"""

from __future__ import annotations

import math

import torch
from scipy.fft import next_fast_len

SAMPLE_RATE = 16000
DECAY_DB = 60.0  # RT60: the time the tail's energy takes to fall by 60 dB


def impulse_responses(
    rt60_s: torch.Tensor, drr_db: torch.Tensor, length: int, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """(B, length) impulse responses: 1 at lag 0, then Gaussian noise under an envelope whose energy falls
    by 60 dB per `rt60_s[b]`, the tail's energy 10 ** (-drr_db[b] / 10) of the direct path's."""
    device = rt60_s.device
    lags = torch.arange(1, length, device=device, dtype=torch.float32)[None, :] / sample_rate
    # Energy falls 60 dB per RT60, i.e. amplitude by 10 ** (-3 t / RT60) (as an exp: ~5x faster than pow).
    envelope = torch.exp(lags * (-(DECAY_DB / 20.0) * math.log(10.0) / rt60_s)[:, None])
    tail = torch.randn(len(rt60_s), length - 1, device=device).mul_(envelope)
    energy = tail.square().sum(dim=1, keepdim=True).clamp_min(1e-12)
    tail = tail.mul_(torch.sqrt(torch.pow(10.0, -drr_db[:, None] / 10.0) / energy))
    direct = torch.ones(len(rt60_s), 1, device=device)
    return torch.cat([direct, tail], dim=1)


def add_reverb(
    x: torch.Tensor,
    p: float,
    rt60_s: tuple[float, float],
    drr_db: tuple[float, float],
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """Float clips (B, L) in [-1, 1]: with probability p per row, reverberated with RT60 U[rt60_s] seconds and
    DRR U[drr_db] dB (causal convolution truncated to L, so speech keeps its place), each scaled to its own
    input energy, clipped to [-1, 1]; the other rows untouched. Draws no random numbers when `p` is 0."""
    if p <= 0 or len(x) == 0:
        return x
    batch, width = x.shape
    chosen = torch.rand(batch, device=x.device) < p
    if not chosen.any():
        return x
    rows = chosen.nonzero().squeeze(1)
    lo, hi = rt60_s
    rt60 = torch.rand(len(rows), device=x.device) * (hi - lo) + lo
    drr = torch.rand(len(rows), device=x.device) * (drr_db[1] - drr_db[0]) + drr_db[0]
    # The tail is cut where it has fallen 60 dB (or at the clip's end): nothing audible is lost.
    length = min(width, max(2, math.ceil(hi * sample_rate)))
    responses = impulse_responses(rt60, drr, length, sample_rate)
    # Linear, not circular, convolution; a 2-3-5-smooth size (28,800 for 1 s and 0.8 s) is ~1.4x faster
    # than the next power of two.
    size = next_fast_len(width + length - 1, real=True)
    dry = x[rows]
    wet = torch.fft.irfft(torch.fft.rfft(dry, size) * torch.fft.rfft(responses, size), size)[:, :width]
    gain = torch.sqrt(dry.square().sum(1, keepdim=True) / wet.square().sum(1, keepdim=True).clamp_min(1e-12))
    out = x.clone()
    out[rows] = wet.mul_(gain).clamp_(-1.0, 1.0)
    return out
