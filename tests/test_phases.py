import pytest

from dsd2.analysis.early_stop import decide, entropy_drop_level
from dsd2.analysis.phases import detect_phases

SDD = [0.60, 0.595, 0.57, 0.53, 0.52, 0.55, 0.64, 0.72, 0.76, 0.75, 0.60, 0.40]


def test_sparse_double_descent_curve_gets_four_phases():
    r = detect_phases(SDD)
    assert r.has_critical and r.sweet_level == 8 and r.critical_level == 4
    # the dip starts once accuracy is more than θ/2 below the running maximum; the sweet phase once it is θ
    # above the critical minimum again; the collapse is the tail more than θ below the peak
    assert r.labels == ["light", "light", "critical", "critical", "critical", "sweet", "sweet", "sweet",
                        "sweet", "sweet", "collapsed", "collapsed"]
    assert r.boundaries == {"light": (0, 1), "critical": (2, 4), "sweet": (5, 9), "collapsed": (10, 11)}
    assert "critical 2-4" in r.describe()


def test_flat_then_collapse_has_no_critical_phase():
    r = detect_phases([0.80, 0.805, 0.80, 0.81, 0.80, 0.79, 0.60, 0.30])
    assert not r.has_critical and r.critical_level is None
    assert r.labels == ["light"] * 6 + ["collapsed"] * 2
    assert "no critical phase" in r.describe()


def test_monotone_curves():
    up = detect_phases([0.5, 0.55, 0.6, 0.65, 0.7])
    assert not up.has_critical and set(up.labels) == {"light"}
    down = detect_phases([0.7, 0.65, 0.6, 0.55, 0.5])
    # the peak is the dense level; every later level is more than 2 points below it
    assert not down.has_critical and down.sweet_level == 0
    assert down.labels == ["light", "collapsed", "collapsed", "collapsed", "collapsed"]


def test_noise_below_threshold_is_not_a_dip():
    assert not detect_phases([0.80, 0.79, 0.81, 0.795, 0.81, 0.70], min_drop=0.02).has_critical
    r = detect_phases([0.80, 0.77, 0.80, 0.83, 0.6], min_drop=0.02)
    assert r.has_critical and r.critical_level == 1 and r.sweet_level == 3
    assert r.labels == ["light", "critical", "sweet", "sweet", "collapsed"]


def test_seed_spread_sets_the_threshold():
    # three seeds at a, a + 0.02, a - 0.02: the seed-to-seed std is 0.02 at every level, so θ = 2 x 0.02
    seeds = [[a + d for a in SDD] for d in (0.0, 0.02, -0.02)]
    r = detect_phases(seeds)
    assert r.threshold == pytest.approx(0.04)
    assert r.has_critical and r.critical_level == 4 and r.sweet_level == 8
    # light until 3 points (> θ/2) below the running maximum; sweet from 0.64 >= 0.52 + θ; collapsed below 0.72
    assert r.boundaries == {"light": (0, 1), "critical": (2, 5), "sweet": (6, 9), "collapsed": (10, 11)}


@pytest.mark.parametrize("spread, theta, has_critical, labels", [
    (0.001, 0.002, True, ["light", "critical", "sweet", "collapsed"]),  # tight seeds: a 2-point dip is real
    (0.03, 0.06, False, ["light", "light", "light", "collapsed"]),  # wide seeds: the same dip is seed noise
])
def test_the_same_dip_is_critical_or_not_by_the_seed_spread(spread, theta, has_critical, labels):
    curve = [0.8, 0.78, 0.81, 0.5]  # dip 2 points, rise 3 points, then collapse
    r = detect_phases([[a + d for a in curve] for d in (0.0, spread, -spread)])
    assert r.threshold == pytest.approx(theta)
    assert r.has_critical is has_critical and r.critical_level == (1 if has_critical else None)
    assert r.sweet_level == 2 and r.labels == labels


def test_entropy_drop_detection():
    assert entropy_drop_level([0.85, 0.84, 0.86, 0.83, 0.78, 0.6], 0.05) == 4
    assert entropy_drop_level([0.85, 0.84, 0.86, 0.83], 0.05) is None


def test_entropy_rule_waits_for_the_drop_then_for_patience():
    ent = [0.85, 0.84, 0.85, 0.84, 0.75, 0.70, 0.65, 0.60, 0.55]
    val = [0.30, 0.29, 0.28, 0.27, 0.33, 0.38, 0.37, 0.36, 0.35]
    # the validation rule stops in the critical phase
    assert decide("val", val[:4], patience=3).stop
    stops = [i - 1 for i in range(1, len(val) + 1) if decide("entropy", val[:i], ent[:i], patience=2).stop]
    assert stops[0] == 7  # drop at 4, best val at 5, two levels without improvement
    d = decide("entropy", val[:8], ent[:8], patience=2)
    assert d.best_level == 5 and d.entropy_drop_level == 4 and "not improved for 2" in d.reason
    assert not decide("entropy", val[:4], ent[:4], patience=1).stop  # stationary: keep pruning
    assert not decide("none", val, ent).stop
    with pytest.raises(ValueError, match="rule 'x'"):
        decide("x", val)


def test_validation_rule_stops_after_patience_levels_without_improvement():
    val = [0.50, 0.60, 0.58, 0.57, 0.59, 0.61]
    # patience 2: best 0.60 at level 1, not beaten at levels 2 and 3 -> stop after level 3
    decisions = [decide("val", val[:i], patience=2) for i in range(1, len(val) + 1)]
    assert [d.stop for d in decisions] == [False, False, False, True, True, False]
    assert decisions[3].level == 3 and decisions[3].best_level == 1
    # patience 3: the stop comes one level later, at level 4
    assert [decide("val", val[:i], patience=3).stop for i in range(1, len(val) + 1)] == [
        False, False, False, False, True, False]
    # an improving curve never stops
    assert not any(decide("val", [0.1, 0.2, 0.3, 0.4][:i], patience=1).stop for i in range(1, 5))


def test_a_level_that_only_equals_the_best_is_no_improvement():
    # a flat validation curve runs out of patience; the model returned is still the sparser of equals
    val = [0.50, 0.60, 0.60, 0.60, 0.60]
    stops = [decide("val", val[:i], patience=3).stop for i in range(1, len(val) + 1)]
    assert stops == [False, False, False, False, True]
    assert decide("val", val, patience=3).best_level == 4
    ent = [1.0, 0.5, 0.5, 0.5, 0.5]  # falling from level 1 on
    assert [decide("entropy", val[:i], ent[:i], patience=3).stop for i in range(1, 6)] == stops
