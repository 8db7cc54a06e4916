"""Phases of sparse double descent on an accuracy-vs-sparsity curve: light, critical, sweet, collapsed.

Landmarks on the (seed-averaged) curve a_0..a_L, with a noise threshold θ:
  * sweet peak s: the level of the highest accuracy;
  * critical level c: before s, the level that falls furthest below the running maximum (the dip);
  * a critical phase exists only if the dip (running max − a_c) and the rise (a_s − a_c) both reach θ.
With a critical phase:
  light     = levels before the dip starts: still within θ/2 of the running maximum,
  critical  = from there until accuracy climbs back θ above a_c,
  sweet     = from there up to the collapse,
  collapsed = the tail after s that stays more than θ below a_s.
Without one: light up to the collapse, then collapsed (no critical, no sweet phase).

θ defaults to 2 × the seed-to-seed standard deviation (median over levels, so a noisy collapsed tail does not
inflate it) when several seeds are given, else a fixed number of
accuracy points (`min_drop`, default 0.02 = 2 points).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

PHASES = ("light", "critical", "sweet", "collapsed")


@dataclass
class PhaseReport:
    labels: list[str]
    threshold: float
    has_critical: bool
    critical_level: int | None
    sweet_level: int
    dip: float
    rise: float
    boundaries: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (first, last) level index

    def describe(self) -> str:
        if not self.has_critical:
            return (f"no critical phase (largest dip {self.dip * 100:.1f} points, rise {self.rise * 100:.1f}, "
                    f"threshold {self.threshold * 100:.1f})")
        parts = [f"{name} {a}-{b}" for name, (a, b) in self.boundaries.items()]
        return (f"{', '.join(parts)} (dip {self.dip * 100:.1f} points, rise {self.rise * 100:.1f}, "
                f"threshold {self.threshold * 100:.1f})")


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], float | None]:
    n = min(len(c) for c in curves)
    mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    if len(curves) < 2:
        return mean, None
    std = statistics.median(statistics.stdev(c[i] for c in curves) for i in range(n))
    return mean, std


def detect_phases(curves: list[float] | list[list[float]], *, min_drop: float = 0.02,
                  seed_std_factor: float = 2.0) -> PhaseReport:
    """Label every level of one curve (list of accuracies) or of several seeds (list of lists)."""
    if not curves:
        raise ValueError("empty curve")
    many = isinstance(curves[0], (list, tuple))
    acc, std = _mean_curve(list(curves)) if many else (list(curves), None)  # type: ignore[arg-type]
    theta = seed_std_factor * std if std is not None and std > 0 else min_drop
    n = len(acc)
    sweet = max(range(n), key=lambda i: acc[i])
    running = [max(acc[: i + 1]) for i in range(n)]
    drops = [running[i] - acc[i] for i in range(sweet + 1)]
    critical = max(range(sweet + 1), key=lambda i: (drops[i], -i))
    dip, rise = drops[critical], acc[sweet] - acc[critical]

    # collapse: the tail after the peak that stays more than θ below it
    collapse = n
    for i in range(n - 1, sweet, -1):
        if acc[i] < acc[sweet] - theta:
            collapse = i
        else:
            break

    has_critical = dip >= theta and rise >= theta
    labels = ["light"] * n
    if has_critical:
        start = critical
        while start > 0 and running[start - 1] - acc[start - 1] > theta / 2:
            start -= 1
        recover = next((i for i in range(critical + 1, sweet + 1) if acc[i] >= acc[critical] + theta), sweet)
        for i in range(n):
            if i >= collapse:
                labels[i] = "collapsed"
            elif i >= recover:
                labels[i] = "sweet"
            elif i >= start:
                labels[i] = "critical"
    else:
        for i in range(collapse, n):
            labels[i] = "collapsed"
    boundaries: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(labels):
        first, _ = boundaries.get(name, (i, i))
        boundaries[name] = (first, i)
    return PhaseReport(labels, theta, has_critical, critical if has_critical else None, sweet, dip, rise,
                       boundaries)
