"""Confidence intervals over seeds and test samples, and the verdict on a sparse-double-descent dip.

Two sources of noise separate one measured curve from the curve of the method: the training run (the seed) and
the finite test set. Every seed of a configuration is evaluated on the same test images at every level, so the
per-sample outcomes (right or wrong, per seed, level and image) are paired across levels and seeds.

The dip. Phases are found on the mean curve m_0..m_L over seeds: the sweet peak s is the level of the highest
mean test accuracy, and the dip is the drop from the dense model to the minimum before it,
    D = max over i <= s of (m_0 - m_i)        (0 when no level before s falls below the dense model).

Its interval. The paired differences d_i = m_0 - m_i vary for two reasons, and each gets its replicates:
  * the test images: a bootstrap redraws them with replacement, one draw shared by every seed and level (paired
    by image), so what the images share across levels cancels in d_i;
  * the seeds: each seed's own difference curve D_j varies around the mean; a Gaussian multiplier bootstrap
    draws replicates with the covariance over levels of the mean of k seeds. With few seeds a per-level variance
    (k - 1 degrees of freedom) is often small by chance, and a maximum over levels would pick exactly those
    levels, so each level's seed variance is floored at a robust average over the levels (a median, scaled), and
    the seed part is widened by Student's t over the normal quantile at the pooled degrees of freedom.
Because D is a maximum over levels, a percentile interval of the bootstrapped maximum would be biased upwards
(on a flat curve it is > 0 almost surely). Instead every d_i gets a simultaneous interval, from the replicates'
largest studentised deviation over i <= s (max-t), and
    lower(D) = max_i lower(d_i),   upper(D) = max_i upper(d_i).
When every d_i lies within its interval at once (probability >= the confidence level), D does too: the interval
holds for the maximum without assuming where the minimum falls. The lower bound looks at the levels up to the
sweet peak of the mean curve. The upper bound looks further, up to the last level whose mean accuracy is not
clearly below the peak's (simultaneous bounds on m_s - m_j): any of those could be the true sweet peak, so a
curve that barely climbs back, or whose highest mean is the dense model by noise, is not called dodged on the
strength of where its maximum happened to fall. Synthetic curves with known answers check it
(tests/test_stats.py): "SDD present" on flat curves at most 5 % of the time, with image noise or seed noise
dominating, and a clear dip found.

The verdict, at confidence 95 % and a margin (default 1 point):
    SDD present    lower(D) > 0: some level before the sweet peak is below the dense model, beyond noise;
    dodged         upper(D) < margin: no level before the sweet peak falls more than the margin below dense;
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
    dip: float  # D on the mean curve (accuracy fraction)
    lower: float
    upper: float
    margin: float
    critical_level: int  # the level index where m_0 - m_i is largest (0 when no level falls below dense)
    sweet_level: int  # the highest mean accuracy
    last_sweet_level: int  # the last level whose mean accuracy is not clearly below it: the upper bound's window
    seeds: int
    samples: int
    seeds_needed: int | None
    note: str

    def describe(self) -> str:
        text = (f"{self.verdict}: dip {self.dip * 100:.1f} points, 95 % CI [{self.lower * 100:.1f}, "
                f"{self.upper * 100:.1f}] (margin {self.margin * 100:.1f}; {self.seeds} seed"
                f"{'s' if self.seeds != 1 else ''}, {self.samples} test images)")
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


def _seed_deviations(x: torch.Tensor, resamples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Deviations [B, S] of the mean differences from seed to seed, and their variances [S].

    Each seed's own difference curve D_j (on all images) varies around the mean; the replicates are Gaussian
    with the covariance of the mean over k seeds (a multiplier bootstrap: smooth where resampling 3 seeds has
    10 outcomes). A variance from k seeds has k - 1 degrees of freedom, and the maximum over levels would favour
    the levels where it came out small by chance, so each level's variance is floored at a robust average over
    the levels (the top-up drawn independently per level) and the whole seed part is widened by the ratio of
    Student's t to the normal quantile at the pooled degrees of freedom."""
    k, s = x.shape[0], x.shape[1]
    if k < 2:
        return torch.zeros(resamples, s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64)
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
    widen = t975((k - 1) * max(s - 1, 1)) / 1.959964
    return dev * widen, floored / k * widen**2


def _max_t_quantile(dev: torch.Tensor, se: torch.Tensor, confidence: float) -> float:
    """The `1 - (1 - confidence) / 2` quantile of max_i dev_i / se_i over the levels whose difference varies."""
    varies = se > 0
    if not bool(varies.any()):
        return 0.0
    t = (dev[:, varies] / se[varies]).amax(1)
    return float(torch.quantile(t, 1 - (1 - confidence) / 2))


def _bounds(dev: torch.Tensor, diffs: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Simultaneous lower and upper bounds of every d_i from the replicates' deviations `dev` [B, S] (max-t)."""
    se = dev.std(0)
    return (diffs - _max_t_quantile(dev, se, confidence) * se, diffs + _max_t_quantile(-dev, se, confidence) * se)


def _last_sweet_level(dev: torch.Tensor, diffs: torch.Tensor, sweet: int, confidence: float) -> int:
    """The last level whose mean accuracy is not clearly below the highest: m_sweet - m_j = d_j - d_sweet has a
    simultaneous lower bound <= 0. Any such level could be the true sweet peak, so a dodge must hold up to it."""
    gap, gap_dev = diffs - diffs[sweet], dev - dev[:, sweet : sweet + 1]
    lower, _ = _bounds(gap_dev, gap, confidence)
    return max(j for j in range(len(diffs)) if j == sweet or lower[j] <= 0)


def dip_verdict(outcomes: torch.Tensor, *, margin: float = DEFAULT_MARGIN, confidence: float = 0.95,
                resamples: int = 2000, seed: int = 0) -> DipVerdict:
    """The dip, its simultaneous bootstrap interval and the verdict, from per-sample outcomes
    `[seeds, levels, test images]` (bool: right or wrong), levels in pruning order, level 0 dense.

    The lower bound looks at the levels up to the sweet peak of the mean curve; the upper bound at the levels up
    to the last one that could be the sweet peak (a curve that never climbs above its dense accuracy by more
    than noise is not called dodged on the strength of the dense level alone)."""
    if outcomes.dim() != 3 or 0 in outcomes.shape:
        raise ValueError(f"outcomes must be [seeds, levels, images] with none empty, got {tuple(outcomes.shape)}")
    k, _, n = outcomes.shape
    x = outcomes.to(torch.float64)
    mean = x.mean((0, 2))
    sweet = int(torch.argmax(mean))
    diffs = mean[0] - mean
    generator = torch.Generator().manual_seed(seed)
    image_dev = _image_deviations(x, resamples, generator)

    def window(last: int) -> tuple[torch.Tensor, torch.Tensor]:  # replicates of d_0..d_last, seed variances
        seed_dev, seed_var = _seed_deviations(x[:, : last + 1], resamples, generator)
        return image_dev[:, : last + 1] + seed_dev, seed_var

    late = _last_sweet_level(window(len(mean) - 1)[0], diffs, sweet, confidence)
    lower_i, _ = _bounds(window(sweet)[0], diffs[: sweet + 1], confidence)
    dev_late, seed_var = window(late)
    _, upper_i = _bounds(dev_late, diffs[: late + 1], confidence)
    dip, lower, upper = float(diffs[: sweet + 1].max()), max(0.0, float(lower_i.max())), max(0.0, float(upper_i.max()))
    present, dodged = lower > 0, upper < margin
    verdict = "dodged" if dodged else "SDD present" if present else "inconclusive"
    notes = ["a dip is detected but stays below the margin"] if present and dodged else []
    if k == 1:
        notes.append("one seed: the interval covers the test images, not seed-to-seed variation")
    note, needed = "; ".join(notes), None
    if verdict == "inconclusive":
        needed, note = _seeds_needed(k, n, diffs[: late + 1], lower_i, upper_i, margin, seed_var,
                                     image_dev[:, : late + 1].var(0))
    return DipVerdict(verdict, dip, lower, upper, margin, int(torch.argmax(diffs[: sweet + 1])), sweet, late, k, n,
                      needed, note)


def _seeds_needed(k: int, n: int, diffs: torch.Tensor, lower_i: torch.Tensor, upper_i: torch.Tensor, margin: float,
                  seed_var: torch.Tensor, image_var: torch.Tensor) -> tuple[int | None, str]:
    """The fewest seeds with which the interval would likely settle the verdict, if the mean curve and the
    per-seed variance stay as measured: the seed part of each bound's width shrinks as 1/k, the image part does
    not (every seed is scored on the same test images)."""
    if k < 2:
        return None, "one seed measures no seed-to-seed variation: run 3 or more"
    targets = []  # (bound's level, its width now, the width that would settle it)
    if len(lower_i) > 1:  # level 0: d = 0 on every seed
        lo_level = 1 + int(torch.argmax(lower_i[1:]))
        if float(diffs[lo_level]) > 0:
            targets.append((lo_level, float(diffs[lo_level] - lower_i[lo_level]), float(diffs[lo_level])))
    hi_level = 1 + int(torch.argmax(upper_i[1:]))
    if float(diffs[hi_level]) < margin:
        targets.append((hi_level, float(upper_i[hi_level] - diffs[hi_level]), margin - float(diffs[hi_level])))
    best = None
    for level, width, room in targets:
        seeds_part, images_part = float(seed_var[level]), float(image_var[level])
        total = seeds_part + images_part
        if total <= 0:
            continue
        for seeds in range(k + 1, MAX_SEEDS_PROJECTED + 1):
            if width * math.sqrt((seeds_part * k / seeds + images_part) / total) < room:
                best = seeds if best is None else min(best, seeds)
                break
    if best is None:
        return None, f"more seeds alone would likely not settle it: the {n} test images bound the interval's width"
    return best, f"about {best} seeds would likely settle it"
