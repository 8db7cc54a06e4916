"""Learning-rate schedules of the level loop: pure functions of (config, level, epoch), so resume is exact."""

from __future__ import annotations

import math

from dsd2.config import Config, OptimConfig


def schedule_lr(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """Learning rate of `epoch` (0-based) in a schedule of `epochs` epochs."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    passed = sum(1 for m in cfg.milestones if epoch >= round(m * epochs))
    return cfg.lr * cfg.gamma ** passed


def epochs_for(cfg: Config, level: int) -> int:
    """Epochs of a level: `dense_epochs` at level 0 (when set), `epochs` after every prune."""
    o = cfg.optim
    return (o.dense_epochs or o.epochs) if level == 0 else o.epochs


def level_lr(cfg: Config, level: int, epoch: int) -> float:
    """Learning rate of `epoch` of `level` under the retraining rule: restart the schedule, fine-tune at a
    fixed reduced rate, or replay the last epochs of the dense schedule (learning-rate rewinding)."""
    o, p = cfg.optim, cfg.prune
    epochs = epochs_for(cfg, level)
    if level == 0 or p.retrain == "restart":
        return schedule_lr(o, epoch, epochs)
    if p.retrain == "finetune":
        return o.lr * p.finetune_lr_scale
    dense = epochs_for(cfg, 0)
    return schedule_lr(o, max(dense - epochs, 0) + epoch, dense)
