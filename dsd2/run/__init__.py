"""Runs of the pruning loop: the level loop, its checkpoints, measures and summary, the teacher, and the
DSD² experiment built from them."""

from dsd2.run.experiment import entropy_of_run, run_experiment, student_config, teacher_config
from dsd2.run.loop import LevelLoop, resolve_device
from dsd2.run.summary import best_level
from dsd2.run.teacher import load_teacher, parse_teacher_spec, resolve_teacher_level

__all__ = ["LevelLoop", "best_level", "entropy_of_run", "load_teacher", "parse_teacher_spec", "resolve_device",
           "resolve_teacher_level", "run_experiment", "student_config", "teacher_config"]
