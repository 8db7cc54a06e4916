"""Confidence intervals over seeds and test samples, and the verdict on a sparse-double-descent dip.

Two sources of noise separate one measured curve from the curve of the method: the training run (the seed) and
the finite test set. Every seed of a configuration is evaluated on the same test images at every level, so the
per-sample outcomes (right or wrong, per seed, level and image) are paired across levels and seeds.

The dip. Sparse double descent is a valley: accuracy drops from the dense model to a critical level c, then
climbs to a sweet peak s after it. On the mean curve m_0..m_L over seeds the dip is the deepest valley,
    D = max over 1 <= c < s of min(m_0 - m_c, m_s - m_c),
the drop from dense counted only as far as the curve climbs back (a curve that only declines has D <= 0; a
second peak below the dense model still makes a valley). Sweet peaks are looked for in the upper half of the
curve's range: a wobble inside the collapse is not a sweet phase.

Its interval. Every drop d_c = m_0 - m_c and every climb m_s - m_c = d_c - d_s varies for two reasons, and each
gets its replicates:
  * the test images: a bootstrap redraws them with replacement, one draw shared by every seed and level (paired
    by image), so what the images share across levels cancels;
  * the seeds: each seed's own difference curve varies around the mean; a Gaussian multiplier bootstrap draws
    replicates with the covariance over levels of the mean of k seeds. With few seeds a per-level variance
    (k - 1 degrees of freedom) is often small by chance, and a maximum over levels would pick exactly those
    levels, so each level's seed variance is floored at a robust average over the levels (a median, scaled), and
    the seed part is widened by Student's t over the normal quantile at the pooled degrees of freedom.
Because D is a maximum, a percentile interval of the bootstrapped maximum would be biased upwards (on a flat curve
it is > 0 almost surely). Instead all drops and climbs get simultaneous intervals, from the replicates' largest
studentised deviation over the whole family (max-t), and
    lower(D) = max over pairs of min(lower(drop), lower(climb)),   upper(D) likewise with the upper bounds.
When every drop and climb lies within its interval at once (probability >= the confidence level), D does too:
the interval holds for the maximum without knowing where the valley is. Synthetic curves with known answers
check it (tests/test_stats.py): "SDD present" on flat curves at most 5 % of the time, with image noise or seed
noise dominating, a clear dip found, and its interval covering the true one.

The verdict, at confidence 95 % and a margin (default 1 point):
    SDD present    lower(D) > 0: a drop from the dense model and a climb after it, both beyond noise;
    dodged         upper(D) < margin: no valley deeper than the margin;
    inconclusive   otherwise, with the number of seeds that would likely settle it (or a note that the test set,
                   not the seeds, limits the interval: every seed is scored on the same images).
A dip detected but entirely below the margin is "dodged" (the note says so).
"""

from __future__ import annotations

import base64
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

VERDICTS = ("SDD present", "dodged", "inconclusive")
DEFAULT_MARGIN = 0.01
MAX_SEEDS_PROJECTED = 200

# two-sided 95 % quantiles of Student's t, df = 1..30 (beyond: the Cornish-Fisher expansion below)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595,
         2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (for a 95 % two-sided interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df} must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean, sample std and the 95 % t-interval of the mean over seeds (no interval from one seed), cut to
    `bounds` where the quantity has them (an accuracy lies in [0, 1])."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": n}
    std = statistics.stdev(values)
    half = t975(n - 1) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "std": std, "ci95": [lo, hi], "n": n}


def median_ci(values: list[float]) -> dict[str, Any]:
    """Median and a distribution-free 95 % interval of it: the j-th smallest and j-th largest values, j the
    largest rank with P(Binomial(n, 1/2) < j) <= 2.5 %, so the interval covers the true median at least 95 % of
    the time whatever the distribution (no interval below 6 values, where even the extremes cover less).
    For ratios of timings, whose outliers (a neighbour, a frequency change) a mean would follow."""
    n = len(values)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    ranked = sorted(values)
    median = statistics.median(ranked)
    log_half_n = n * math.log(0.5)

    def pmf(k: int) -> float:  # P(Binomial(n, 1/2) = k), in logs: 2**-n underflows past n = 1074
        return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half_n)

    tail, j = 0.0, 0  # tail = P(Binomial(n, 1/2) <= j - 1)
    while tail + pmf(j) <= 0.025:
        tail += pmf(j)
        j += 1
    if j == 0:
        return {"median": median, "ci95": None, "n": n}
    return {"median": median, "ci95": [ranked[j - 1], ranked[n - j]], "n": n}


# ---- per-sample outcomes, stored with each level -----------------------------------------------------------------

def pack_outcomes(correct: torch.Tensor) -> str:
    """A boolean vector (one entry per test image, in the test set's order) as base64 of its bits, 8 per byte,
    the first image in the highest bit."""
    bits = correct.detach().to("cpu", torch.uint8).flatten()
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (bits * weights).sum(1, dtype=torch.uint8)
    return base64.b64encode(bytes(packed.tolist())).decode()


def unpack_outcomes(text: str, n: int) -> torch.Tensor:
    """The boolean vector of `n` entries that `pack_outcomes` stored."""
    raw = torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8)
    if raw.numel() * 8 < n:
        raise ValueError(f"stored outcomes hold {raw.numel() * 8} bits, fewer than the {n} test images")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((raw[:, None] >> shifts) & 1).flatten()[:n].bool()


# ---- the dip and its verdict ---------------------------------------------------------------------------------------

@dataclass
class DipVerdict:
    verdict: str
    dip: float  # the valley V on the mean curve (accuracy fraction): min(drop, rise) of the deepest valley
    lower: float  # the 95 % interval of V
    upper: float
    margin: float
    drop: float  # m_0 - m_c: from the dense model down to the critical level
    rise: float  # m_s - m_c: from the critical level up to the sweet peak after it
    critical_level: int  # c (0 when the curve has no valley)
    sweet_level: int  # s
    seeds: int
    samples: int
    seeds_needed: int | None
    note: str

    def describe(self) -> str:
        text = (f"{self.verdict}: dip {self.dip * 100:.1f} points, 95 % CI [{self.lower * 100:.1f}, "
                f"{self.upper * 100:.1f}] (drop {self.drop * 100:.1f} from dense to level {self.critical_level}, "
                f"rise {self.rise * 100:.1f} to level {self.sweet_level}; margin {self.margin * 100:.1f}; "
                f"{self.seeds} seed{'s' if self.seeds != 1 else ''}, {self.samples} test images)")
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "describe": self.describe()}


def _image_deviations(x: torch.Tensor, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """Bootstrap deviations [B, L] of the mean differences d_i = m_0 - m_i from redrawing the test images with
    replacement (one draw shared by every seed and level: paired by image)."""
    n = x.shape[-1]
    picks = torch.randint(n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(resamples, n, dtype=torch.float64))
    curves = torch.einsum("bn,kln->bl", counts, x) / (n * x.shape[0])
    full = x.mean((0, 2))
    return (curves[:, :1] - curves) - (full[:1] - full)


def _seed_deviations(x: torch.Tensor, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """Deviations [B, S] of the mean differences from seed to seed.

    Each seed's own difference curve D_j (on all images) varies around the mean; the replicates are Gaussian
    with the covariance of the mean over k seeds (a multiplier bootstrap: smooth where resampling 3 seeds has
    10 outcomes). A variance from k seeds has k - 1 degrees of freedom, and the maximum over levels would favour
    the levels where it came out small by chance, so each level's variance is floored at a robust average over
    the levels (the top-up drawn independently per level) and the whole seed part is widened by the ratio of
    Student's t to the normal quantile at the pooled degrees of freedom."""
    k, s = x.shape[0], x.shape[1]
    if k < 2:
        return torch.zeros(resamples, s, dtype=torch.float64)
    acc = x.mean(-1)
    d = acc[:, :1] - acc  # [k, S]
    centred = d - d.mean(0)
    var = centred.pow(2).sum(0) / (k - 1)
    # a robust average: the median of the levels' variances, divided by the median of chi2_{k-1} / (k - 1)
    # (Wilson-Hilferty), so a collapsed tail's large variances do not widen every level
    floor = var[1:].median() / (1 - 2 / (9 * (k - 1))) ** 3 if s > 1 else var.new_zeros(())
    weights = torch.randn(resamples, k, generator=generator, dtype=torch.float64)
    dev = weights @ centred / math.sqrt(k * (k - 1))
    floored = torch.maximum(var, floor)
    floored[0] = 0.0  # d_0 = 0 on every seed
    top_up = (floored - var) / k
    dev = dev + torch.randn(resamples, s, generator=generator, dtype=torch.float64) * top_up.sqrt()
    return dev * t975((k - 1) * max(s - 1, 1)) / 1.959964


def _max_t_quantile(dev: torch.Tensor, se: torch.Tensor, confidence: float) -> float:
    """The `1 - (1 - confidence) / 2` quantile of max_i dev_i / se_i over the levels whose difference varies."""
    varies = se > 0
    if not bool(varies.any()):
        return 0.0
    t = (dev[:, varies] / se[varies]).amax(1)
    return float(torch.quantile(t, 1 - (1 - confidence) / 2))


def _bounds(dev: torch.Tensor, est: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Simultaneous lower and upper bounds of every estimate in `est` [F] from the replicates' deviations `dev`
    [B, F] (max-t over the whole family)."""
    if est.numel() == 0:
        return est, est
    se = dev.std(0)
    return (est - _max_t_quantile(dev, se, confidence) * se, est + _max_t_quantile(-dev, se, confidence) * se)


def _pairs(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (critical c, sweet s) with 1 <= c < s whose sweet level is in the upper half of the mean curve's
    range: a bump inside the collapse is not a sweet phase."""
    levels = mean.numel()
    c, s = torch.triu_indices(levels, levels, offset=1)
    keep = (c >= 1) & (mean[s] >= (mean.max() + mean.min()) / 2)
    return c[keep], s[keep]


def _valley(drop: torch.Tensor, rise: torch.Tensor) -> tuple[float, int]:
    """max over pairs of min(drop, rise), and the pair's index (-1 for no pair)."""
    if drop.numel() == 0:
        return 0.0, -1
    depth = torch.minimum(drop, rise)
    best = int(torch.argmax(depth))
    return float(depth[best]), best


def dip_verdict(outcomes: torch.Tensor, *, margin: float = DEFAULT_MARGIN, confidence: float = 0.95,
                resamples: int = 2000, seed: int = 0) -> DipVerdict:
    """The dip, its simultaneous bootstrap interval and the verdict, from per-sample outcomes
    `[seeds, levels, test images]` (bool: right or wrong), levels in pruning order, level 0 dense."""
    if outcomes.dim() != 3 or 0 in outcomes.shape:
        raise ValueError(f"outcomes must be [seeds, levels, images] with none empty, got {tuple(outcomes.shape)}")
    k, levels, n = outcomes.shape
    x = outcomes.to(torch.float64)
    mean = x.mean((0, 2))
    d = mean[0] - mean  # d_i = m_0 - m_i
    generator = torch.Generator().manual_seed(seed)
    image_dev = _image_deviations(x, resamples, generator)
    seed_dev = _seed_deviations(x, resamples, generator)
    dev = image_dev + seed_dev
    c, s = _pairs(mean)
    # the family: every drop d_c and every rise m_s - m_c = d_c - d_s, bounded simultaneously
    est = torch.cat([d[c], d[c] - d[s]])
    lo, hi = _bounds(torch.cat([dev[:, c], dev[:, c] - dev[:, s]], 1), est, confidence)
    p = c.numel()
    dip, best = _valley(d[c], d[c] - d[s])
    lower, _ = _valley(lo[:p], lo[p:])
    upper, at_upper = _valley(hi[:p], hi[p:])
    raw = (lower, upper)  # unclipped: how far each bound is from settling the verdict
    lower, upper = max(lower, 0.0), max(upper, 0.0)
    present, dodged = lower > 0, upper < margin and levels >= 3
    verdict = "dodged" if dodged else "SDD present" if present else "inconclusive"
    notes = ["a dip is detected but stays below the margin"] if present and dodged else []
    if levels < 3:
        notes.append(f"{levels} level{'s' if levels > 1 else ''}: a valley needs the dense level and two more")
    if k == 1:
        notes.append("one seed: the interval covers the test images, not seed-to-seed variation")
    note, needed = "; ".join(notes), None
    if verdict == "inconclusive" and levels >= 3:
        # inconclusive on three or more levels means some pair exists: the one that sets the upper bound, and its
        # side (drop, or rise when that binds) gives the image and seed variances the projection scales
        j = at_upper
        parts = [part[:, c[j]] - (part[:, s[j]] if hi[p + j] < hi[j] else 0) for part in (image_dev, seed_dev)]
        needed, note = _seeds_needed(k, n, dip, *raw, margin, float(parts[0].var()), float(parts[1].var()))
    cl = int(c[best]) if dip > 0 else 0  # the valley's bottom, and the peak after it (the sweet level)
    sl = cl + int(torch.argmax(mean[cl:]))
    return DipVerdict(verdict, max(dip, 0.0), lower, upper, margin, float(d[cl]), float(mean[sl] - mean[cl]), cl, sl,
                      k, n, needed, note)


def _seeds_needed(k: int, n: int, dip: float, lower: float, upper: float, margin: float, image_var: float,
                  seed_var: float) -> tuple[int | None, str]:
    """The fewest seeds with which the interval would likely settle the verdict, if the mean curve and the
    per-seed variance stay as measured: the seed part of a bound's width shrinks as 1/k, the image part does not
    (every seed is scored on the same test images). The variances are those of the estimate that sets the upper
    bound."""
    if k < 2:
        return None, "one seed measures no seed-to-seed variation: run 3 or more"
    total = image_var + seed_var
    targets = [(dip - lower, dip)] if dip > 0 else []  # (the width now, the width that would settle it)
    if dip < margin:
        targets.append((upper - dip, margin - dip))
    best = None
    for width, room in targets:
        for seeds in range(k + 1, MAX_SEEDS_PROJECTED + 1) if total > 0 else ():
            if width * math.sqrt((seed_var * k / seeds + image_var) / total) < room:
                best = seeds if best is None else min(best, seeds)
                break
    if best is None:
        return None, f"more seeds alone would likely not settle it: the {n} test images bound the interval's width"
    return best, f"about {best} seeds would likely settle it"
