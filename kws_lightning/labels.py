"""The label map: `silence`, `unknown`, then the keywords, in that order (index 0, 1, 2, ...)."""

from __future__ import annotations

from collections.abc import Sequence

SILENCE = "silence"
UNKNOWN = "unknown"
# The Kaggle challenge's ten keywords, in its order.
DEFAULT_KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE_INDEX = 0
UNKNOWN_INDEX = 1
# Speech Commands' own folder for noise recordings; never a word.
BACKGROUND_NOISE_DIR = "_background_noise_"


def make_labels(keywords: Sequence[str] = DEFAULT_KEYWORDS) -> list[str]:
    """Return the class names for `keywords`: ``["silence", "unknown", *keywords]``."""
    keywords = list(keywords)
    not_text = [k for k in keywords if not isinstance(k, str)]
    if not_text:
        # YAML 1.1 reads bare yes/no/on/off as booleans: the commonest way to get here.
        raise ValueError(
            f"keywords must be strings, got {not_text}: quote them in YAML ('yes', 'no', 'on', 'off')"
        )
    if not keywords:
        raise ValueError("keywords is empty: name at least one keyword, e.g. keywords=[yes,no]")
    clashes = {SILENCE, UNKNOWN} & set(keywords)
    if clashes:
        raise ValueError(f"keywords {sorted(clashes)} clash with the reserved labels silence/unknown")
    duplicates = sorted({k for k in keywords if keywords.count(k) > 1})
    if duplicates:
        raise ValueError(f"keywords repeat {duplicates}: each keyword once")
    return [SILENCE, UNKNOWN, *keywords]
