"""Training: objectives, masked optimizers, learning-rate schedules, and the executors that run epochs.

One training step, on one screen: `executor.train_epoch` → `inputs.forward_loss` → backward → masked step.
"""

from dsd2.training.executor import make_executor, train_epoch
from dsd2.training.inputs import InputFormat, TrainFeed, autocast, forward_loss, predict
from dsd2.training.objectives import CrossEntropy, DistillationObjective, Objective, as_objective, cross_entropy
from dsd2.training.optim import MaskedAdam, build_optimizer
from dsd2.training.schedule import epochs_for, level_lr, schedule_lr

__all__ = [
    "CrossEntropy", "DistillationObjective", "InputFormat", "MaskedAdam", "Objective", "TrainFeed", "as_objective",
    "autocast", "build_optimizer", "cross_entropy", "epochs_for", "forward_loss", "level_lr", "make_executor",
    "predict", "schedule_lr", "train_epoch",
]
