"""Wall-clock timing the benchmark scripts share: one call, the median of several after a warm-up, and several
functions timed in turn."""

from __future__ import annotations

import statistics
import time


def timed(fn) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_it(fn, repeats: int) -> float:
    """The median of `repeats` calls after a warm-up one."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def time_together(fns: list, repeats: int) -> list[float]:
    """The median of `repeats` calls of each, after a warm-up call of each, taken in turn (a, b, c, a, b, c, ...):
    a drift of the machine's speed during the run moves every column alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(timed(fn))
    return [statistics.median(t) for t in times]
