"""The DSD² experiment (teacher curve, teacher level, students), and entropy measured on a finished run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dsd2.config import Config, DistillConfig, ModelConfig, from_dict, validate
from dsd2.data import build_splits
from dsd2.models import build_model
from dsd2.pruning import count_sparsity
from dsd2.run import measure
from dsd2.run.cores import Job, computing_threads, plan_workers, run_jobs
from dsd2.run.identity import upgrade_runs
from dsd2.run.loop import LevelLoop, build_run_model, check_levels, input_format, resolve_device
from dsd2.run.state import Checkpointer, saved_levels
from dsd2.run.summary import seed_curves, student_entry
from dsd2.run.teacher import resolve_teacher_level
from dsd2.runs import RunDir, RunError, write_json, write_jsonl
from dsd2.training import TrainFeed, cross_entropy, make_executor
from dsd2.training.distributed import context as dist_context
from dsd2.training.precision import concrete_precision


def student_config(cfg: Config, kind: str, teacher_dir: Path, teacher_hash: str, level: int) -> Config:
    """The config of one student run of the DSD² experiment."""
    k = cfg.distill
    model = ModelConfig(name=k.student_model, hidden=tuple(k.student_hidden), depth=k.student_depth,
                        width=k.student_width)
    teacher_level = 0 if kind == "kd-dense" else level
    teacher = None if kind == "vanilla" else f"{teacher_dir}:{teacher_level}"
    teacher_id = None if teacher is None else f"{teacher_hash}:{teacher_level}"
    out = replace(cfg, model=model, distill=replace(k, students=(), teacher=teacher, teacher_id=teacher_id))
    validate(out)
    return out


def teacher_config(cfg: Config) -> Config:
    """The teacher's own run: independent of student-only settings, so a sweep over alpha reuses it."""
    return replace(cfg, distill=DistillConfig(students=(), teacher=None, teacher_id=None))


def run_once(cfg: Config, run: RunDir, log: Callable[[str], None], loop: LevelLoop | None = None,
             **kwargs) -> dict[str, Any]:
    """The run's summary: read when it has finished with this config, else from running (or resuming) it, on
    `loop` when one is given (already made for this config and directory)."""
    return run.finished(cfg.run_hash()) or (loop or LevelLoop(cfg, run, log=log, **kwargs)).run()


def claim_experiment(cfg: Config, root: RunDir) -> None:
    ctx = dist_context()
    if ctx.is_main:
        upgrade_runs(root.root, {cfg.legacy_run_hash(): cfg.run_hash()})  # an experiment 0.1.0 wrote
    ctx.barrier()
    resumed = root.claim(cfg.to_dict(), cfg.run_hash(), write=False)  # every rank checks, rank 0 writes
    ctx.barrier()
    if ctx.is_main and not resumed:
        root.claim(cfg.to_dict(), cfg.run_hash())
    ctx.barrier()


@dataclass
class Experiment:
    """One DSD² experiment made ready to run: its bad input refused and its directory claimed. Its runs come in two
    batches, each of runs that do not wait for each other: the teacher's curve and the vanilla student's, then
    the distilled students (their teacher level is chosen from the finished teacher)."""

    cfg: Config
    root: RunDir
    name: str = ""  # the log's prefix for its runs ("seed 1 "), empty for a lone experiment
    teacher_loop: LevelLoop | None = None  # prepared to check the input; the teacher's run here reuses it

    @classmethod
    def prepare(cls, cfg: Config, root: RunDir, name: str = "", *, progress: bool = True,
                log: Callable[[str], None] = print) -> Experiment:
        tcfg, teacher_run = teacher_config(cfg), RunDir(root.root / "teacher")
        teacher_loop = LevelLoop(tcfg, teacher_run, progress=progress, log=log)
        teacher_loop.prepare()  # bad input fails here, before the experiment directory is claimed
        # and so does the student's (its config, and the level count on its model), before the teacher trains
        probe = student_config(cfg, "vanilla", teacher_run.root, "", 0)
        with torch.random.fork_rng(devices=[]):
            check_levels(probe, build_model(probe.model, teacher_loop.splits.input_shape,
                                            teacher_loop.splits.num_classes))
        claim_experiment(cfg, root)
        return cls(cfg, root, name, teacher_loop)

    @property
    def teacher(self) -> Job:
        return Job(f"{self.name}teacher: the vanilla IMP curve", teacher_config(self.cfg),
                   RunDir(self.root.root / "teacher"))

    def _student(self, kind: str, teacher_hash: str, level: int) -> Job:
        scfg = student_config(self.cfg, kind, self.teacher.run_dir.root.resolve(), teacher_hash, level)
        return Job(f"{self.name}student {kind}", scfg, RunDir(self.root.root / "students" / kind))

    def first_jobs(self) -> list[Job]:
        """The teacher and, beside it, the vanilla student (it learns from the labels alone)."""
        vanilla = [self._student("vanilla", "", 0)] if "vanilla" in self.cfg.distill.students else []
        return [replace(self.teacher, loop=self.teacher_loop), *vanilla]

    def teacher_level(self, log: Callable[[str], None]) -> int:
        level = resolve_teacher_level(self.teacher.run_dir, str(self.cfg.distill.teacher_level))
        log(f"== {self.name}teacher level {level} selected ({self.cfg.distill.teacher_level})")
        return level

    def second_jobs(self, level: int) -> list[Job]:
        """The distilled students, from the finished teacher at its level 0 and at the selected level."""
        teacher = self.teacher
        done = teacher.run_dir.finished(teacher.config.run_hash())
        return [self._student(kind, done["run_hash"], level) for kind in self.cfg.distill.students if kind != "vanilla"]

    def finish(self, level: int) -> dict[str, Any]:
        """The experiment's summary.json, from its finished runs."""
        cfg, teacher = self.cfg, self.teacher
        done = teacher.run_dir.finished(teacher.config.run_hash())
        students: dict[str, Any] = {}
        for kind in cfg.distill.students:
            srun = self._student(kind, done["run_hash"], level).run_dir
            students[kind] = student_entry(srun.summary(), srun.levels(), str(srun.root), cfg.analysis.dodge_margin)
        summary = {"run_hash": cfg.run_hash(), "finished": True, "experiment": "dsd2",
                   "teacher": {"run": str(teacher.run_dir.root), "selected_level": level,
                               "rule": str(cfg.distill.teacher_level), "best_test_acc": done["best_test_acc"],
                               "dense_test_acc": done["dense_test_acc"],
                               "train_pflops_dense": done["train_pflops_dense"]},
                   "students": students,
                   # keys shared with a single run's summary, so `train` prints one line either way
                   **{k: done[k] for k in ("best_level", "best_sparsity", "best_val_acc", "best_test_acc",
                                            "dense_test_acc")}}
        if dist_context().is_main:
            write_json(self.root.summary_path, summary)
        dist_context().barrier()
        return summary


def run_experiments(experiments: list[Experiment], workers: int, *, progress: bool = True,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Several experiments (the seeds of one configuration), each batch of all of them side by side."""
    run_jobs([j for e in experiments for j in e.first_jobs()], workers, progress=progress, log=log)
    levels = [e.teacher_level(log) for e in experiments]
    run_jobs([j for e, level in zip(experiments, levels) for j in e.second_jobs(level)], workers,
             progress=progress, log=log)
    return [e.finish(level) for e, level in zip(experiments, levels)]


def run_experiment(cfg: Config, root: RunDir, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The DSD² experiment in one directory: the teacher's IMP curve (teacher/), the selection of the teacher
    level, then each student pruned by the same loop (students/<kind>/): vanilla, distilled from the dense
    teacher, distilled from the selected sparse teacher. Every part is a resumable run of its own; the parts that
    do not wait for each other run side by side where `plan_workers` says so. With `cfg.seeds`, one such
    experiment per seed (`run_seeds`)."""
    cfg = concrete_precision(cfg)  # students train in the teacher's precision, as the config names it
    if cfg.seeds:
        return run_seeds(cfg, root, progress=progress, log=log)
    if not cfg.distill.students:
        return LevelLoop(cfg, root, progress=progress, log=log).run()
    experiment = Experiment.prepare(cfg, root, progress=progress, log=log)
    return run_experiments([experiment], plan_workers(cfg), progress=progress, log=log)[0]


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one seed's run of a configuration with several seeds."""
    return replace(cfg, seed=seed, seeds=())


def seed_dirs(root: RunDir, seeds: tuple[int, ...] | list[int]) -> list[RunDir]:
    return [RunDir(root.root / f"seed-{s}") for s in seeds]


def run_seeds(cfg: Config, root: RunDir, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every seed of `cfg.seeds` as its own resumable run (the experiment, or a run of the level loop) in
    ROOT/seed-S, side by side where `plan_workers` says so, then their aggregate in ROOT/summary.json
    (`aggregate_seeds`)."""
    claim_experiment(cfg, root)
    workers = plan_workers(cfg)
    todo = [(seed, sub) for seed, sub in zip(cfg.seeds, seed_dirs(root, cfg.seeds))
            if sub.finished(seed_config(cfg, seed).run_hash()) is None]
    # side by side, every seed is made ready (its input checked) before any trains; one after another, each when
    # its turn comes, and the loop made ready is the one that runs
    batches = [todo] if workers > 1 else [[one] for one in todo]
    for batch in batches:
        if cfg.distill.students:
            run_experiments([Experiment.prepare(seed_config(cfg, seed), sub, f"seed {seed} ", progress=progress,
                                                log=log) for seed, sub in batch], workers, progress=progress, log=log)
            continue
        loops = [LevelLoop(seed_config(cfg, seed), sub, progress=progress, log=log) for seed, sub in batch]
        for loop in loops:
            loop.prepare()
        run_jobs([Job(f"seed {seed}", loop.cfg, sub, loop) for (seed, sub), loop in zip(batch, loops)], workers,
                 progress=progress, log=log)
    summary = aggregate_seeds(cfg, root)
    if dist_context().is_main:
        write_json(root.summary_path, summary)
    dist_context().barrier()
    return summary


def aggregate_seeds(cfg: Config, root: RunDir) -> dict[str, Any]:
    """The summary of a configuration run over seeds: for the teacher and each student (or the one run), every
    curve point and headline number with its 95 % interval, the phases of the mean curve and the verdict."""
    subs = seed_dirs(root, cfg.seeds)
    names = list(subs[0].parts()) if subs[0].is_experiment() else ["run"]
    curves = {}
    for name in names:
        runs = [sub.parts()[name] if name != "run" else sub for sub in subs]
        curves[name] = seed_curves([r.levels() for r in runs], cfg.analysis.dodge_margin, [r.summary() for r in runs])
        curves[name]["runs"] = [str(r.root) for r in runs]
    return {"run_hash": cfg.run_hash(), "finished": True, "experiment": "seeds", "seeds": list(cfg.seeds),
            "dodge_margin": cfg.analysis.dodge_margin, "curves": curves}


def entropy_of_run(run_dir: RunDir, *, data_root: str | None = None, granularity: str | None = None,
                   inclusive: bool | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Entropy of ReLU states of every saved level of an existing run (also runs made without the measure).

    Writes `entropy.jsonl` into the run directory and returns its rows.
    """
    stored = run_dir.stored_config()
    if stored is None:
        raise RunError(f"'{run_dir.root}' holds no dsd2 run (no config.yaml)")
    cfg = from_dict(stored["config"])
    cfg.data.data_root = data_root or cfg.data.data_root
    cfg.analysis.granularity = granularity or cfg.analysis.granularity
    cfg.analysis.inclusive = cfg.analysis.inclusive if inclusive is None else inclusive
    levels = saved_levels(run_dir)
    if not levels:
        raise RunError(f"'{run_dir.root}' has no level checkpoints yet")
    with computing_threads(cfg):  # the thread count its training computed at
        return _entropy_of_run(run_dir, stored["run_hash"], cfg, levels, log)


def _entropy_of_run(run_dir: RunDir, run_hash: str, cfg: Config, levels: dict[int, Path],
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    device = resolve_device(cfg.device)
    splits = build_splits(cfg.data, cfg.seed, device)
    model, relus = build_run_model(cfg, splits, device, counting=True)
    checkpointer = Checkpointer(run_hash, model, relus, device)
    fmt = input_format(cfg, splits, device, model)
    executor = make_executor(model, TrainFeed(splits.train, cfg.optim.batch_size, fmt), cross_entropy, relus, cfg.seed,
                             splits.num_classes, dist_ctx=dist_context(), cuda_graphs=cfg.cuda_graphs,
                             cpu_step=cfg.cpu_step)
    rows = []
    for path in levels.values():
        restored = checkpointer.load(path)
        executor.count(splits.train)
        zeros, total = count_sparsity(model)
        row = {"level": restored.level, "sparsity": zeros / total, "granularity": cfg.analysis.granularity,
               "inclusive": cfg.analysis.inclusive, **measure.entropy_metrics(relus)}
        rows.append(row)
        log(f"level {row['level']:2d}  sparsity {row['sparsity']:.4f}  entropy {row['entropy_mean']:.4f} bits "
            f"(neuron-weighted {row['entropy_weighted']:.4f})")
    write_jsonl(run_dir.root / "entropy.jsonl", rows)
    return rows
