"""Group a sweep's jobs that differ only in their seed: mean ± std per configuration (the sweep summary's
second table, written by kws_lightning/sweep_summary.py when the jobs vary `seed`).

    python -m kws_lightning.train -m experiment=feature_sweep seed=1,2,3
    # -> sweep_summary.md: every job ranked, then one row per feature x learning rate over its 3 seeds

A configuration is a job's overrides without ``seed=...``; its value is the mean of its successful jobs'
optimised metric, its spread the sample standard deviation (n - 1; blank for n = 1). Jobs without a value
(failed, interrupted, diverged) are counted under `failed`, not averaged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from kws_lightning.utils.job_result import OK, JobResult

SEED_KEYS = ("seed", "+seed", "++seed")
GROUPS_CSV_NAME = "sweep_summary_groups.csv"
GROUP_COLUMNS = ("rank", "configuration", "n", "mean", "std", "min", "max", "seeds", "failed")


@dataclass
class Group:
    """The jobs of one configuration (same overrides but the seed)."""

    configuration: str
    seeds: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    failed: int = 0
    rank: int | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def split_seed(overrides: Sequence[str]) -> tuple[list[str], str | None]:
    """(the overrides without the seed, the seed's value or None)."""
    rest, seed = [], None
    for override in overrides:
        key, _, value = override.partition("=")
        if key in SEED_KEYS:
            seed = value
        else:
            rest.append(override)
    return rest, seed


def varies_seed(results: Sequence[tuple[str, JobResult]]) -> bool:
    """True when the jobs were run with more than one seed (so grouping them says something)."""
    return len({split_seed(r.overrides)[1] for _, r in results}) > 1


def group_jobs(
    results: Sequence[tuple[str, JobResult]], direction: str, common: Sequence[str] = ()
) -> list[Group]:
    """One `Group` per configuration, ranked by mean (best first; groups without a value last).

    `common` (overrides every job shares) is left out of the configuration's name, as in the job table.
    """
    if direction not in ("max", "min"):
        raise ValueError(f"direction={direction!r} must be 'max' or 'min'")
    groups: dict[str, Group] = {}
    for _, result in results:
        rest, seed = split_seed(result.overrides)
        name = " ".join(o for o in rest if o not in common)
        group = groups.setdefault(name, Group(name))
        group.seeds.append("default" if seed is None else seed)
        if result.status == OK and result.value is not None and math.isfinite(result.value):
            group.values.append(float(result.value))
        else:
            group.failed += 1
    sign = -1.0 if direction == "max" else 1.0
    valued = sorted((g for g in groups.values() if g.values), key=lambda g: sign * g.mean)
    for rank, group in enumerate(valued, start=1):
        group.rank = rank
    return valued + [g for g in groups.values() if not g.values]


def group_cells(group: Group) -> dict[str, str]:
    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    return {
        "rank": "" if group.rank is None else str(group.rank),
        "configuration": group.configuration,
        "n": str(group.n),
        "mean": number(group.mean),
        "std": number(group.std),
        "min": number(min(group.values, default=None)),
        "max": number(max(group.values, default=None)),
        "seeds": " ".join(group.seeds),
        "failed": str(group.failed),
    }


def groups_markdown(groups: Sequence[Group], metric: str | None) -> str:
    """The grouped table, and how the best configuration's lead compares with the seed spread."""
    name = metric or "value"
    lines = [
        "",
        "## By configuration, over seeds",
        "",
        f"{name}: mean ± sample std over the jobs that differ only in `seed` (n = successful jobs), "
        "ranked by mean.",
        "",
        f"| rank | configuration | n | {name} mean ± std | min | max | seeds | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        cells = group_cells(group)
        spread = f"{cells['mean']} ± {cells['std']}" if cells["std"] else cells["mean"]
        configuration = f"`{cells['configuration']}`" if cells["configuration"] else "(all jobs)"
        row = [cells["rank"], configuration, cells["n"], spread, cells["min"], cells["max"], cells["seeds"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [*row, cells["failed"]]) + " |")
    ranked = [g for g in groups if g.rank is not None]
    if len(ranked) >= 2 and ranked[0].std is not None and ranked[1].std is not None:
        first, second = ranked[0], ranked[1]
        gap, spread = abs(first.mean - second.mean), max(first.std, second.std)
        verdict = "more than" if gap > spread else "within"
        lines += [
            "",
            f"The best configuration leads the next by {gap:.4f}, {verdict} the larger seed-to-seed std "
            f"({spread:.4f}).",
        ]
    return "\n".join(lines) + "\n"
