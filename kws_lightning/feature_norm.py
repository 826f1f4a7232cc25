"""Feature normalisation, the last step of every front end: features (B, 1, T, F) -> per-bin scaled features.

Modes (``feature.normalize``):

* ``none``: the features as computed, the seeds' exact numbers (on dev-set speech MFCC spans about -200..+40,
  log-mel -100..+23 dB, the log-spectrogram -23..-5).
* ``per_utterance``: each clip's frequency bins are shifted and scaled to mean 0 / std 1 over its frames
  (NeMo's ``normalize: per_feature``; cepstral mean and variance normalisation for MFCC). Stateless. A bin
  whose std over the clip is below ``eps`` is divided by eps rather than scaled up to 1 (see FeatureNorm).
* ``dataset``: one per-bin mean and std for the whole data set, estimated once at fit start from a few
  thousand training clips (kws_lightning/feature_stats.py) and kept as buffers, so checkpoints and exports
  carry them and inference never re-estimates them. Until estimated they are 0 / 1 (the identity).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

# A Literal, so the config check (which reads constructor hints) refuses a typo before anything runs.
NormalizeMode = Literal["none", "per_utterance", "dataset"]
NORMALIZE_MODES: tuple[str, ...] = get_args(NormalizeMode)


class FeatureNorm(nn.Module):
    """Normalises features (B, C, T, F) per frequency bin F; see the module docstring for the modes.

    `eps`, in feature units (log power; dB for log-mel), floors the std a bin is divided by: the clip's
    (``per_utterance``) or the data set's (``dataset``), so a constant bin (digital silence) maps to 0.
    1e-2, not NeMo's 1e-5 added to the std: float32 features are resolved to ~1e-5..1e-4 (values up to
    ~200), so a bin that barely moves over a clip (a steady tone's or a click train's; a log-spectrogram bin
    at its eps floor) was its rounding noise scaled to unit variance, different in PyTorch and in an ONNX
    export (issue 29: logits 0.04..1.0 apart on test tones). A bin whose std exceeds eps is scaled as before
    but for the 1e-5 no longer added (the smallest per-clip MFCC std of 600 dev clips is 0.17).
    """

    def __init__(self, mode: NormalizeMode = "none", num_bins: int | None = None, eps: float = 1e-2) -> None:
        super().__init__()
        if mode not in NORMALIZE_MODES:
            raise ValueError(
                f"feature.normalize={mode!r} is not a normalisation mode; choose one of {NORMALIZE_MODES}"
            )
        self.mode = mode
        self.eps = float(eps)
        if mode == "dataset":
            if num_bins is None or num_bins < 1:
                raise ValueError(f"normalize=dataset needs the front end's number of bins, got {num_bins!r}")
            # Persistent: saved in checkpoints and loaded with them; the identity until estimated.
            self.register_buffer("mean", torch.zeros(num_bins))
            self.register_buffer("std", torch.ones(num_bins))
            # A bool, not a float: weight averaging (EMA) copies it rather than averaging it.
            self.register_buffer("fitted", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"mode={self.mode}"

    @property
    def needs_statistics(self) -> bool:
        """True for a ``dataset`` normaliser whose statistics have not been estimated (or loaded) yet."""
        return self.mode == "dataset" and not bool(self.fitted)

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the data set's per-bin mean and std (``dataset`` mode) and mark them estimated."""
        if self.mode != "dataset":
            raise ValueError(f"set_statistics needs normalize=dataset, this front end has {self.mode!r}")
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"statistics of shape {tuple(mean.shape)} / {tuple(std.shape)} for {self.mean.numel()} bins"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std >= 0).all()):
            raise ValueError("feature statistics must be finite with std >= 0")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(self.eps))  # a constant bin maps to 0, not to inf
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return features
        if self.mode == "per_utterance":
            # Over time (dim -2), per bin. The second centring pass removes the first mean's rounding error
            # (~1e-7 of the values) from a constant bin (digital silence, -23 in log-spectrogram units).
            # Population variance: one frame gives 0.
            centred = features - features.mean(dim=-2, keepdim=True)
            centred = centred - centred.mean(dim=-2, keepdim=True)
            # The floor goes on the variance, so sqrt never sees 0 (a finite gradient for a silent bin).
            variance = centred.square().mean(dim=-2, keepdim=True)
            return centred / variance.clamp_min(self.eps**2).sqrt()
        # The buffers follow .half() / .double(); the features keep the front end's compute dtype. No eps
        # here: set_statistics floors std at eps, and the unestimated 0 / 1 are then an exact identity.
        return (features - self.mean.to(features.dtype)) / self.std.to(features.dtype)
