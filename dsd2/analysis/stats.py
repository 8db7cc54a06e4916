"""Confidence intervals over seeds and test samples, and the verdict on a sparse-double-descent dip.

Two sources of noise separate one measured curve from the curve of the method: the training run (the seed) and
the finite test set. Every seed of a configuration is evaluated on the same test images at every level, so the
per-sample outcomes (right or wrong, per seed, level and image) are paired across levels and seeds.

The dip. Phases are found on the mean curve m_0..m_L over seeds: the sweet peak s is the level of the highest
mean test accuracy, and the dip is the drop from the dense model to the minimum before it,
    D = max over i <= s of (m_0 - m_i)        (0 when no level before s falls below the dense model).

Its interval. A bootstrap draws the test images with replacement (one draw shared by every seed and level:
paired by sample) and, independently, the seeds with replacement (the seed part scaled by sqrt(k / (k - 1)), the
usual correction that makes its variance the unbiased one of a mean of k). Because D is a maximum over levels,
a percentile interval of the bootstrapped maximum would be biased upwards (on a flat curve it is > 0 almost
surely). Instead every paired difference d_i = m_0 - m_i gets a simultaneous interval, from the bootstrap
distribution of the largest studentised deviation over i <= s (max-t), and
    lower(D) = max_i lower(d_i),   upper(D) = max_i upper(d_i).
With probability >= the confidence level every d_i lies within its interval at once, so D does too: the
intervals are valid for the maximum without assuming where the minimum falls. The sweet level is taken from
the mean curve and held fixed (phases are read on the mean curve).

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
    sweet_level: int
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


def _replicates(acc_boot: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean curves of the bootstrap replicates: `acc_boot` [B, k, S] are each seed's accuracies on the
    replicate's resampled images; the seeds are resampled too (scaled to the unbiased variance)."""
    b, k, _ = acc_boot.shape
    mean = acc_boot.mean(1)
    if k < 2:
        return mean
    picks = torch.randint(k, (b, k), generator=generator)
    counts = torch.zeros(b, k, dtype=acc_boot.dtype).scatter_add_(1, picks, torch.ones(b, k, dtype=acc_boot.dtype))
    resampled = (counts[:, :, None] * acc_boot).sum(1) / k
    return mean + math.sqrt(k / (k - 1)) * (resampled - mean)


def _sample_boot(x: torch.Tensor, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """Per-seed accuracies [B, k, S] on `resamples` draws of the test images with replacement (one draw shared
    by every seed and level)."""
    n = x.shape[-1]
    picks = torch.randint(n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(resamples, n, dtype=torch.float64))
    return torch.einsum("bn,ksn->bks", counts, x) / n


def _max_t_quantile(dev: torch.Tensor, se: torch.Tensor, confidence: float) -> float:
    """The `1 - (1 - confidence) / 2` quantile of max_i dev_i / se_i over the levels whose difference varies."""
    varies = se > 0
    if not bool(varies.any()):
        return 0.0
    t = (dev[:, varies] / se[varies]).amax(1)
    return float(torch.quantile(t, 1 - (1 - confidence) / 2))


def dip_verdict(outcomes: torch.Tensor, *, margin: float = DEFAULT_MARGIN, confidence: float = 0.95,
                resamples: int = 2000, seed: int = 0) -> DipVerdict:
    """The dip, its simultaneous bootstrap interval and the verdict, from per-sample outcomes
    `[seeds, levels, test images]` (bool: right or wrong), levels in pruning order, level 0 dense."""
    if outcomes.dim() != 3 or 0 in outcomes.shape:
        raise ValueError(f"outcomes must be [seeds, levels, images] with none empty, got {tuple(outcomes.shape)}")
    k, _, n = outcomes.shape
    x = outcomes.to(torch.float64)
    mean = x.mean((0, 2))
    sweet = int(torch.argmax(mean))
    x = x[:, : sweet + 1]
    diffs = mean[0] - mean[: sweet + 1]
    generator = torch.Generator().manual_seed(seed)
    curves = _replicates(_sample_boot(x, resamples, generator), generator)
    boot = curves[:, :1] - curves
    dev = boot - diffs
    se = dev.std(0)
    lower_i = diffs - _max_t_quantile(dev, se, confidence) * se
    upper_i = diffs + _max_t_quantile(-dev, se, confidence) * se
    dip, lower, upper = float(diffs.max()), max(0.0, float(lower_i.max())), max(0.0, float(upper_i.max()))
    present, dodged = lower > 0, upper < margin
    verdict = "dodged" if dodged else "SDD present" if present else "inconclusive"
    notes = ["a dip is detected but stays below the margin"] if present and dodged else []
    if k == 1:
        notes.append("one seed: the interval covers the test images, not seed-to-seed variation")
    note = "; ".join(notes)
    needed = None
    if verdict == "inconclusive":
        needed, note = _seeds_needed(x, diffs, lower_i, upper_i, margin, confidence, resamples, generator)
    return DipVerdict(verdict, dip, lower, upper, margin, int(torch.argmax(diffs)), sweet, k, n, needed, note)


def _variance_parts(x: torch.Tensor, level: int, resamples: int, generator: torch.Generator) -> tuple[float, float]:
    """Bootstrap variances of m_0 - m_level from the seeds alone (all images) and from the images alone."""
    per_seed = x.mean(-1)[None]  # [1, k, S]
    seed_only = _replicates(per_seed.expand(resamples, -1, -1), generator)
    image_only = _sample_boot(x, resamples, generator).mean(1)
    parts = [float((c[:, 0] - c[:, level]).var()) for c in (seed_only, image_only)]
    return parts[0], parts[1]


def _seeds_needed(x: torch.Tensor, diffs: torch.Tensor, lower_i: torch.Tensor, upper_i: torch.Tensor,
                  margin: float, confidence: float, resamples: int,
                  generator: torch.Generator) -> tuple[int | None, str]:
    """The fewest seeds with which the interval would likely settle the verdict, if the mean curve and the
    per-seed variance stay as measured: the seed part of each bound's width shrinks as 1/k, the image part does
    not (every seed is scored on the same test images)."""
    k = x.shape[0]
    if k < 2:
        return None, "one seed measures no seed-to-seed variation: run 3 or more"
    targets = []  # (bound's level, its width now, the width that would settle it)
    lo_level, hi_level = 1 + int(torch.argmax(lower_i[1:])), 1 + int(torch.argmax(upper_i[1:]))  # level 0: d = 0
    if float(diffs[lo_level]) > 0:
        targets.append((lo_level, float(diffs[lo_level] - lower_i[lo_level]), float(diffs[lo_level])))
    if float(diffs[hi_level]) < margin:
        targets.append((hi_level, float(upper_i[hi_level] - diffs[hi_level]), margin - float(diffs[hi_level])))
    best = None
    for level, width, room in targets:
        seed_var, image_var = _variance_parts(x, level, resamples, generator)
        total = seed_var + image_var
        if total <= 0:
            continue
        for seeds in range(k + 1, MAX_SEEDS_PROJECTED + 1):
            if width * math.sqrt((seed_var * k / seeds + image_var) / total) < room:
                best = seeds if best is None else min(best, seeds)
                break
    if best is None:
        return None, (f"more seeds alone would likely not settle it: the {x.shape[-1]} test images bound the "
                      "interval's width")
    return best, f"about {best} seeds would likely settle it"
