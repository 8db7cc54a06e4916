"""The dip's interval and verdict on synthetic outcomes with known curves (dsd2/analysis/stats.py)."""

import math
import statistics
from fractions import Fraction

import pytest
import torch

from dsd2.analysis.stats import dip_verdict, mean_ci, median_ci, pack_outcomes, t975, unpack_outcomes

LEVELS = 29


def synthetic(curve, seeds, images, generator, seed_sd=0.005, noise=0.3):
    """Per-sample outcomes [seeds, levels, images] whose expected accuracy at level i is curve[i] (plus a
    per-seed offset of std `seed_sd`): an image's latent difficulty is shared by every seed and level, so the
    outcomes are paired as a real test set's are; `noise` sets how often two models disagree on an image."""
    p = torch.tensor(curve, dtype=torch.float64)[None] + seed_sd * torch.randn(seeds, len(curve), generator=generator,
                                                                                 dtype=torch.float64)
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(p.clamp(0.01, 0.99)) * math.sqrt(1 + noise**2)
    difficulty = torch.randn(images, generator=generator, dtype=torch.float64)
    jitter = noise * torch.randn(seeds, len(curve), images, generator=generator, dtype=torch.float64)
    return difficulty + jitter < threshold[..., None]


FLAT = [0.8] * LEVELS
# a 5-point dip before the sweet peak (levels 3-6), the peak 5 points above dense, then the collapse
DIP = [0.8, 0.79, 0.77, 0.75, 0.75, 0.75, 0.76, 0.78, 0.8, 0.82, 0.84, 0.85, 0.85, 0.85, 0.84, 0.8, 0.7, 0.6, 0.5,
       0.4] + [0.3] * 9
# rises from dense to the peak without a dip (what a dodge looks like), then collapses
RISE = [0.8 + 0.01 * i for i in range(12)] + [0.8 - 0.05 * i for i in range(1, 18)]


def rate(curve, verdict, trials, images=597, seeds=3, **kw):
    g = torch.Generator().manual_seed(1234)
    hits = sum(dip_verdict(synthetic(curve, seeds, images, g, **kw), resamples=400, seed=t).verdict == verdict
               for t in range(trials))
    return hits / trials


def test_flat_noisy_curves_rarely_claim_a_dip():
    assert rate(FLAT, "SDD present", 100) <= 0.05


def test_flat_curves_with_large_seed_noise_rarely_claim_a_dip():
    # seed-to-seed variation dominates: only resampling the seeds keeps the interval honest
    assert rate(FLAT, "SDD present", 60, images=5000, seed_sd=0.02) <= 0.05


def test_a_single_seed_flat_curve_rarely_claims_a_dip():
    assert rate(FLAT, "SDD present", 60, seeds=1) <= 0.05


def test_a_clear_dip_is_found():
    assert rate(DIP, "SDD present", 40) >= 0.9


def test_a_rising_curve_is_called_dodged_with_enough_test_images():
    assert rate(RISE, "dodged", 30, images=20000) >= 0.8


def test_the_dip_interval_covers_the_true_dip():
    g = torch.Generator().manual_seed(7)
    covered = 0
    for t in range(40):
        v = dip_verdict(synthetic(DIP, 3, 597, g), resamples=400, seed=t)
        covered += v.lower <= 0.05 <= v.upper
        assert v.sweet_level in range(9, 16) and v.critical_level in range(2, 7)
    assert covered / 40 >= 0.9


def test_inconclusive_says_how_many_seeds_would_settle_it():
    # a 3-point dip with seed noise dominating and many test images: more seeds shrink the interval
    curve = [0.8, 0.78, 0.77, 0.77, 0.78] + [0.78 + 0.01 * i for i in range(1, 8)] + [0.5] * 17
    g = torch.Generator().manual_seed(3)
    v = dip_verdict(synthetic(curve, 3, 20000, g, seed_sd=0.03), resamples=400)
    assert v.verdict == "inconclusive"
    assert v.seeds_needed is not None and v.seeds_needed > 3
    assert f"about {v.seeds_needed} seeds" in v.note


def test_inconclusive_names_the_test_set_when_seeds_cannot_settle_it():
    # every seed gets the same images right (no seed noise at all): only more test images would help
    curve = [0.8, 0.79, 0.78, 0.79, 0.8, 0.81, 0.81] + [0.5] * 22
    g = torch.Generator().manual_seed(5)
    v = dip_verdict(synthetic(curve, 3, 300, g, seed_sd=0.0, noise=0.0), resamples=400)
    assert v.verdict == "inconclusive"
    assert v.seeds_needed is None and "300 test images" in v.note


def test_the_verdict_uses_the_margin():
    g = torch.Generator().manual_seed(11)
    x = synthetic(RISE, 3, 20000, g)
    assert dip_verdict(x, margin=0.02, resamples=400).verdict == "dodged"
    assert dip_verdict(x, margin=0.0005, resamples=400).verdict == "inconclusive"


def test_identical_levels_have_an_exact_zero_dip():
    x = torch.rand(2, 1, 50, generator=torch.Generator().manual_seed(0)) < 0.7
    v = dip_verdict(x.expand(2, 5, 50).clone(), resamples=100)
    assert (v.dip, v.lower, v.upper, v.verdict) == (0.0, 0.0, 0.0, "dodged")


def test_too_few_levels_give_no_dodge():
    x = torch.rand(2, 2, 50, generator=torch.Generator().manual_seed(0)) < 0.7
    v = dip_verdict(x, resamples=100)
    assert v.verdict == "inconclusive" and "a valley needs the dense level and two more" in v.note


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="seeds, levels, images"):
        dip_verdict(torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 597])
def test_outcomes_pack_and_unpack(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    assert torch.equal(unpack_outcomes(pack_outcomes(x), n), x)
    assert len(pack_outcomes(x)) == 4 * math.ceil(math.ceil(n / 8) / 3)


def test_outcomes_refuse_too_few_bits():
    with pytest.raises(ValueError, match="fewer than the 20 test images"):
        unpack_outcomes(pack_outcomes(torch.ones(8, dtype=torch.bool)), 20)


def test_t_quantiles():
    assert t975(2) == pytest.approx(4.3027)
    assert t975(30) == pytest.approx(2.0423)
    assert t975(31) == pytest.approx(2.0395, abs=2e-4)
    assert t975(1000) == pytest.approx(1.9623, abs=2e-4)


def test_mean_ci():
    out = mean_ci([0.80, 0.82, 0.84])
    assert out["mean"] == pytest.approx(0.82) and out["std"] == pytest.approx(0.02)
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert out["ci95"] == pytest.approx([0.82 - half, 0.82 + half])
    assert mean_ci([0.5]) == {"mean": 0.5, "std": None, "ci95": None, "n": 1}


def test_median_ci_takes_the_binomial_ranks():
    # n = 30: P(Binomial(30, 1/2) <= 9) = 2.14 %, <= 10 is 4.94 %: the 10th smallest and the 10th largest
    values = [float(v) for v in range(30, 0, -1)]
    assert median_ci(values) == {"median": 15.5, "ci95": [10.0, 21.0], "n": 30}
    assert median_ci([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])["ci95"] == [1.0, 6.0]  # 6 values: the extremes, 96.9 %
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0])["ci95"] is None  # the extremes of 5 cover only 93.8 %
    with pytest.raises(ValueError, match="at least one value"):
        median_ci([])


@pytest.mark.parametrize("n", [7, 61, 1074, 1200, 5000])
def test_median_ci_takes_the_exact_binomial_ranks_past_where_two_to_the_minus_n_underflows(n):
    tail, j = Fraction(0), 0  # the rank in exact arithmetic
    while tail + Fraction(math.comb(n, j), 2**n) <= Fraction(1, 40):
        tail += Fraction(math.comb(n, j), 2**n)
        j += 1
    assert median_ci([float(v) for v in range(n)])["ci95"] == [float(j - 1), float(n - j)]


def test_median_ci_covers_a_skewed_median_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        draws = torch.empty(31).exponential_(generator=generator).tolist()  # median ln 2, a long right tail
        lo, hi = median_ci(draws)["ci95"]
        covered += lo <= math.log(2) <= hi
    assert 0.95 <= covered / trials <= 0.985  # exact coverage at n = 31: 97.1 %


def test_a_dip_whose_second_peak_stays_below_dense_is_found():
    # the narrow student's shape: a 16-point drop, then an 11-point climb to a peak still below the dense model, so
    # the highest mean is the dense level; the valley counts as deep as the smaller of drop and climb
    curve = [0.82, 0.76, 0.72, 0.68, 0.67, 0.66, 0.67, 0.71, 0.72, 0.75, 0.77, 0.77, 0.72, 0.7, 0.62] + [
        0.5 - 0.03 * i for i in range(14)]
    g = torch.Generator().manual_seed(21)
    verdicts = [dip_verdict(synthetic(curve, 3, 597, g), resamples=300, seed=t) for t in range(20)]
    assert sum(v.verdict == "SDD present" for v in verdicts) >= 18
    assert all(v.critical_level in range(3, 8) and v.sweet_level in range(9, 13) for v in verdicts)
    assert statistics.median(v.drop for v in verdicts) == pytest.approx(0.16, abs=0.02)
    assert statistics.median(v.dip for v in verdicts) == pytest.approx(0.11, abs=0.02)


def test_a_bump_inside_the_collapse_is_no_sweet_phase():
    # the collapse wobbles by 4 points near the floor: no valley is found there
    curve = [0.8 + 0.01 * i for i in range(10)] + [0.6, 0.4, 0.2, 0.14, 0.18, 0.12, 0.1] + [0.1] * 12
    g = torch.Generator().manual_seed(2)
    v = dip_verdict(synthetic(curve, 3, 5000, g), resamples=300)
    assert v.verdict == "dodged" and v.sweet_level == 9
