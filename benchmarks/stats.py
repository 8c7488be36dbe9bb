"""Means over seeds with 95% t-intervals, and paired differences between two strategies.

A suite (:mod:`flexsfl.benchmarks.suites`) runs every strategy once per seed, and a seed fixes the
partition and the new weights, so two strategies' runs with the same seed saw the same data: their
per-seed *difference* removes the partition's share of the variance, and its t-interval is what
says whether one beats the other (a paired t-test). With n seeds the interval is

    mean ± t_{0.975, n-1} · s / √n        s: the sample standard deviation (ddof = 1)

Student's t quantile comes from scipy (installed with the bench extra); with one seed there is no
interval (``half`` is None), and the tables print the mean alone. Which sign is a win depends on the
metric: higher accuracy, lower perplexity (:func:`verdict`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["Interval", "t_interval", "paired_difference", "verdict"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """``mean ± half`` (a ``level`` confidence interval) over ``n`` values; ``half`` None when n < 2."""

    mean: float
    half: float | None
    n: int
    level: float = 0.95

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0 (a difference beyond the noise)."""
        return self.half is not None and abs(self.mean) > self.half

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``0.812 ± 0.031`` (``+0.012 ± 0.020`` when ``signed``); the mean alone without an interval."""
        m = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return m if self.half is None else f"{m} ± {self.half:.{digits}f}"


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values`` (independent draws, e.g. one per seed)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    if x.size < 2:
        return Interval(float(x[0]), None, 1, level)
    se = float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(float(x.mean()), float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * se, int(x.size), level)


def paired_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                      level: float = 0.95) -> tuple[Interval, dict[int, float]] | None:
    """``a − b`` seed by seed (the seeds both have a value for) and the t-interval of those
    differences; None when no seed has both."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    if not seeds:
        return None
    diffs = {s: float(a[s]) - float(b[s]) for s in seeds}
    return t_interval(list(diffs.values()), level), diffs


def verdict(d: Interval | None, *, lower_is_better: bool = False) -> str:
    """A paired difference ``reference − run``: "wins" or "loses" for the reference only when the interval
    excludes 0, "tie" otherwise, "—" without an interval. ``lower_is_better`` (perplexity): a
    negative difference — the reference lower — is the win."""
    if d is None or d.half is None:
        return "—"
    if not d.excludes_zero():
        return "tie"
    return "wins" if (d.mean < 0) == lower_is_better else "loses"
