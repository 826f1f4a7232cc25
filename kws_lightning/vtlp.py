"""Vocal tract length perturbation (VTLP; Jaitly & Hinton, ICML 2013 workshop): training clips' spectra
warped along the frequency axis by a factor alpha per clip, as a shorter or longer vocal tract would move
the formants, without changing tempo (speed perturbation changes both) or anything but the spectrum.

The warp acts on the linear power spectrum inside the mel front ends (`MelPowerSpectrogram`), folded into
their filter bank (one bank per clip), so MFCC and log-mel recipes get the same warp: the module hands a
`VTLP` to the front end in training steps only (validation, test, checkpoints and exports never see it).

The map is Jaitly & Hinton's piecewise-linear one: f -> alpha f up to a boundary of
`boundary_hz` x min(alpha, 1), then a straight line to the Nyquist frequency, which stays fixed.
"""

from __future__ import annotations

import torch


class VTLP:
    """With probability `p` per clip a warp factor alpha ~ U[min_factor, max_factor] (> 1: formants up),
    otherwise 1 (the clip's spectrum unchanged)."""

    def __init__(
        self, p: float = 1.0, min_factor: float = 0.9, max_factor: float = 1.1, boundary_hz: float = 4800.0
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"vtlp.p must be a probability in [0, 1], got {p!r}")
        if not 0.0 < min_factor <= max_factor:
            raise ValueError(
                f"vtlp needs 0 < min_factor <= max_factor, got [{min_factor!r}, {max_factor!r}]; "
                "e.g. vtlp.min_factor=0.9 vtlp.max_factor=1.1"
            )
        if not boundary_hz > 0:
            raise ValueError(f"vtlp.boundary_hz must be > 0 Hz, got {boundary_hz!r}")
        self.p = float(p)
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        self.boundary_hz = float(boundary_hz)

    def __repr__(self) -> str:
        factors = f"[{self.min_factor}, {self.max_factor}]"
        return f"VTLP(p={self.p}, factors={factors}, boundary_hz={self.boundary_hz})"

    def factors(self, batch: int, device: torch.device) -> torch.Tensor:
        """One warp factor per clip (B,), drawn with torch's generator (seeded by the run's seed)."""
        alpha = self.min_factor + (self.max_factor - self.min_factor) * torch.rand(batch, device=device)
        keep = torch.rand(batch, device=device) >= self.p
        return torch.where(keep, torch.ones_like(alpha), alpha)

    def __call__(self, basis: torch.Tensor, batch: int, sample_rate: int) -> torch.Tensor:
        """The front end's filter bank (M, F), F = n_fft // 2 + 1 bins up to `sample_rate` / 2, warped for
        each of `batch` clips: (B, M, F). Applying it equals warping each clip's power spectrum first."""
        factors = self.factors(batch, basis.device)
        return warp_filter_bank(basis, factors, sample_rate, self.boundary_hz)


def source_bins(
    factors: torch.Tensor, n_bins: int, sample_rate: int, boundary_hz: float = 4800.0
) -> torch.Tensor:
    """(B, n_bins) fractional input bin whose power lands in each output bin: the inverse of the warp
    f -> alpha f (f <= b / alpha, b = boundary_hz min(alpha, 1)), then linear up to the fixed Nyquist."""
    nyquist = sample_rate / 2.0
    if boundary_hz >= nyquist:
        raise ValueError(
            f"vtlp.boundary_hz must be below the Nyquist frequency {nyquist:g} Hz, got {boundary_hz}"
        )
    # In bin units (Nyquist = the last bin), so a factor of 1 maps every bin to itself exactly.
    top = float(n_bins - 1)
    out = torch.arange(n_bins, device=factors.device, dtype=factors.dtype)
    alpha = factors.unsqueeze(1)
    knee_out = (boundary_hz / nyquist * top) * torch.clamp(alpha, max=1.0)  # leaves the line f' = alpha f
    knee_in = knee_out / alpha
    upper = knee_in + (out - knee_out) * (top - knee_in) / (top - knee_out)
    return torch.where(out <= knee_out, out / alpha, upper).clamp(0.0, top)


def warp_filter_bank(
    basis: torch.Tensor, factors: torch.Tensor, sample_rate: int, boundary_hz: float
) -> torch.Tensor:
    """Filter bank (M, F) -> one per clip (B, M, F) such that ``bank[b] @ power`` equals ``basis @`` clip b's
    power warped by its factor (linearly interpolated between bins). Folding the warp into the bank costs
    O(B M F) instead of O(B F T) gathers; a factor of exactly 1 gives the bank back unchanged."""
    n_bins = basis.shape[1]
    source = source_bins(factors.to(basis.dtype), n_bins, sample_rate, boundary_hz)  # (B, F)
    low = source.floor().long().clamp(max=n_bins - 2)
    weight = (source - low).unsqueeze(1)  # (B, 1, F)
    shape = (factors.shape[0], *basis.shape)
    rows = basis.unsqueeze(0).expand(shape)
    index = low.unsqueeze(1).expand(shape)
    # Output bin k reads input bins low_k (1 - w_k) and low_k + 1 (w_k): its filter weights move there.
    bank = torch.zeros(shape, dtype=basis.dtype, device=basis.device)
    bank.scatter_add_(2, index, rows * (1 - weight))
    return bank.scatter_add_(2, index + 1, rows * weight)
