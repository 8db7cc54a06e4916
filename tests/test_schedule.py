"""Learning-rate schedules of the level loop (dsd2.training.schedule) against hand-computed values."""

import pytest

from dsd2.config import OptimConfig, build_config
from dsd2.training.schedule import epochs_for, level_lr, schedule_lr

COS4 = [0.1, 0.08535533905932738, 0.05, 0.014644660940672627]  # 0.1 * (1 + cos(pi * e / 4)) / 2


def config(optim=None, prune=None):
    return build_config(None, None, {"optim": {"lr": 0.1, **(optim or {})}, "prune": prune or {}})


def rates(cfg, level):
    return [level_lr(cfg, level, e) for e in range(epochs_for(cfg, level))]


@pytest.mark.parametrize("optim, epochs, expected", [
    ({"lr_schedule": "constant"}, 5, [0.1] * 5),
    ({"lr_schedule": "cosine"}, 4, COS4),
    ({"lr_schedule": "cosine"}, 3, [0.1, 0.075, 0.025]),  # cos(pi/3) = 1/2, cos(2 pi/3) = -1/2
    # x0.1 at epochs 4 (50 %) and 6 (75 %) of 8
    ({"lr_schedule": "multistep"}, 8, [0.1] * 4 + [0.01] * 2 + [0.001] * 2),
    ({"lr_schedule": "multistep", "milestones": (0.25,), "gamma": 0.5}, 4, [0.1, 0.05, 0.05, 0.05]),
    ({"lr_schedule": "multistep", "milestones": (0.5, 0.75), "gamma": 0.2}, 4, [0.1, 0.1, 0.02, 0.004]),
])
def test_schedule_lr(optim, epochs, expected):
    cfg = OptimConfig(lr=0.1, **optim)
    assert [schedule_lr(cfg, e, epochs) for e in range(epochs)] == pytest.approx(expected, rel=1e-12, abs=0)


def test_epochs_for_dense_epochs_unset_and_set():
    unset = config({"epochs": 3, "dense_epochs": None})
    assert [epochs_for(unset, lvl) for lvl in (0, 1, 5)] == [3, 3, 3]
    dense = config({"epochs": 3, "dense_epochs": 7})
    assert [epochs_for(dense, lvl) for lvl in (0, 1, 5)] == [7, 3, 3]


# 4 dense epochs, 2 epochs per level
@pytest.mark.parametrize("schedule, retrain, level0, later", [
    ("cosine", "restart", COS4, [0.1, 0.05]),  # the schedule restarts over the level's 2 epochs
    ("multistep", "restart", [0.1, 0.1, 0.01, 0.001], [0.1, 0.01]),  # milestones round(1) = 1, round(1.5) = 2
    ("constant", "restart", [0.1] * 4, [0.1, 0.1]),
    ("cosine", "finetune", COS4, [0.001, 0.001]),  # lr x finetune_lr_scale (0.01), fixed
    ("multistep", "finetune", [0.1, 0.1, 0.01, 0.001], [0.001, 0.001]),
    ("cosine", "lr-rewind", COS4, COS4[2:]),  # the last 2 epochs of the dense schedule
    ("multistep", "lr-rewind", [0.1, 0.1, 0.01, 0.001], [0.01, 0.001]),
])
def test_level_lr_under_each_retraining_rule(schedule, retrain, level0, later):
    cfg = config({"lr_schedule": schedule, "epochs": 2, "dense_epochs": 4}, {"retrain": retrain})
    assert rates(cfg, 0) == pytest.approx(level0, rel=1e-12, abs=0)
    for lvl in (1, 2, 7):
        assert rates(cfg, lvl) == pytest.approx(later, rel=1e-12, abs=0)


def test_finetune_scale_is_read_from_the_config():
    cfg = config({"epochs": 2, "dense_epochs": 4}, {"retrain": "finetune", "finetune_lr_scale": 0.1})
    assert rates(cfg, 1) == pytest.approx([0.01, 0.01], rel=1e-12)


@pytest.mark.parametrize("retrain", ["restart", "lr-rewind"])
def test_without_dense_epochs_every_level_replays_the_whole_schedule(retrain):
    # dense_epochs unset: level 0 has the levels' 4 epochs, so restart and lr-rewind agree
    cfg = config({"lr_schedule": "cosine", "epochs": 4, "dense_epochs": None}, {"retrain": retrain})
    for lvl in (0, 1, 3):
        assert rates(cfg, lvl) == pytest.approx(COS4, rel=1e-12, abs=0)


def test_lr_rewind_longer_than_the_dense_schedule_is_refused():
    """Learning-rate rewinding replays the last `epochs` epochs of the dense schedule: a level longer than that
    schedule has nothing to replay (a cosine replay would run past its end, at rate 0, then climb back up)."""
    from dsd2.config import ConfigError

    with pytest.raises(ConfigError, match=r"^retrain 'lr-rewind' replays the last 4 epochs of the dense "
                                          r"schedule, which has 2; use --epochs at most 2[^\n]*$"):
        config({"lr_schedule": "cosine", "epochs": 4, "dense_epochs": 2}, {"retrain": "lr-rewind"})
