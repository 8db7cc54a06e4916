"""Accuracy-vs-sparsity curves: seed aggregation and the size of a sparse-double-descent dip."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


@dataclass
class CurvePoint:
    level: int
    sparsity: float
    mean: float
    std: float
    n: int


def aggregate(runs: list[list[dict[str, Any]]], key: str = "test_acc") -> list[CurvePoint]:
    """Mean and sample std of `key` per level over runs (seeds); levels present in every run only."""
    if not runs:
        return []
    common = set.intersection(*({r["level"] for r in rows} for rows in runs))
    points = []
    for level in sorted(common):
        vals = [next(r for r in rows if r["level"] == level) for rows in runs]
        xs = [v[key] for v in vals]
        points.append(CurvePoint(level, statistics.fmean(v["sparsity"] for v in vals), statistics.fmean(xs),
                                 statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)))
    return points


@dataclass
class DipReport:
    dense: float
    peak_before_dip: float
    critical_level: int
    critical: float
    sweet_level: int
    sweet: float
    final: float

    @property
    def dip(self) -> float:
        """How far the critical phase falls below the best accuracy seen before it."""
        return self.peak_before_dip - self.critical

    @property
    def rise(self) -> float:
        """How far the sweet phase climbs above the critical minimum."""
        return self.sweet - self.critical


def dip_report(values: list[float]) -> DipReport:
    """Sweet phase = the global maximum; critical = the level before it that falls furthest below the
    running maximum (the largest drop); the dip is that drop, the rise is sweet minus critical.

    On a curve that never drops before its maximum the dip is 0 and the critical level is the first.
    """
    if not values:
        raise ValueError("empty curve")
    sweet = max(range(len(values)), key=lambda i: values[i])
    drops = [max(values[: i + 1]) - values[i] for i in range(sweet + 1)]
    critical = max(range(sweet + 1), key=lambda i: (drops[i], -i))
    peak = max(values[: critical + 1])
    return DipReport(values[0], peak, critical, values[critical], sweet, values[sweet], values[-1])
