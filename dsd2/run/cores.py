"""How runs use the CPU's cores: the thread count a run computes at, and independent runs side by side.

A small model cannot keep two cores busy. The digits MLP's fused epoch is 1.3x faster on two threads than on one
on a Zen 4 and slower on a Zen 3 (benchmarks/bench_cpu_step.py), where two runs side by side, one thread each, do
twice the work; and its numbers depend on the thread count (a GEMM or a reduction splits its sums by thread). So a
run of an MLP on the CPU computes at one thread (`run_threads`), whatever the machine has: its numbers are the same
on a 2-core and a 64-core machine, and the other cores run other runs. The seeds of
`--seeds`, the parts of the experiment that do not wait for each other and the settings of a study or a sweep run
side by side, one worker process per core (`plan_workers`, `run_jobs`). A run computes the same numbers in a worker
as in the calling process (tests/test_cores.py), writes the same run directory and resumes the same way; a
finished run is not started. Any other run computes at torch's thread count (all cores), one at a time.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures.process
import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsd2.config import Config
from dsd2.runs import RunDir

SMALL_MODELS = ("mlp", "lenet300")  # Linear/ReLU chains: a run cannot keep two cores busy


@dataclass(frozen=True)
class Job:
    """One run of the level loop: its config, its directory and the name the log gives it; `loop`, that run's
    LevelLoop already prepared (to check its input), which a run here reuses rather than preparing it again."""

    name: str
    config: Config
    run_dir: RunDir
    loop: Any = field(default=None, compare=False, repr=False)


def small_cpu_run(cfg: Config) -> bool:
    """An MLP (mlp or lenet300, the teacher's network and the students') trained on the CPU in one process."""
    from dsd2.training.distributed import context as dist_context

    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    models = (cfg.model.name, *((cfg.distill.student_model,) if cfg.distill.students else ()))
    return all(m in SMALL_MODELS for m in models) and on_cpu and not dist_context().enabled


def run_threads(cfg: Config) -> int:
    """The thread count a run of `cfg` computes at: one for a small CPU run, torch's own for anything else."""
    return 1 if small_cpu_run(cfg) else torch.get_num_threads()


@contextlib.contextmanager
def computing_threads(cfg: Config) -> Iterator[int]:
    """The process computes at `run_threads(cfg)` inside; torch's thread count is restored after."""
    before = torch.get_num_threads()
    threads = run_threads(cfg)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def plan_workers(cfg: Config) -> int:
    """How many runs of `cfg`'s kind go side by side: one per core (torch's thread count) for small CPU runs, at
    most `cfg.jobs` of them when it is given, and one (one after another) for anything else. A run's numbers do
    not depend on it: its thread count is `run_threads`, side by side or not."""
    if not small_cpu_run(cfg):
        return 1
    cores = torch.get_num_threads()
    return min(cfg.jobs, cores) if cfg.jobs else cores


def phase_workers(jobs: Sequence[Job]) -> int:
    """How many of `jobs` go side by side: as many as the least parallel of those still to run allows
    (`plan_workers`), so MLP students run one per core once their conv teacher is done, or in a phase of their own."""
    todo = [j for j in jobs if j.run_dir.finished(j.config.run_hash()) is None]
    return min((plan_workers(j.config) for j in todo), default=1)


def run_jobs(jobs: Sequence[Job], workers: int, *, progress: bool = True, log: Callable[[str], None] = print,
             errors: list[str] | None = None) -> list[dict[str, Any] | None]:
    """Each job's summary, in the order given: a finished run's is read, the others are run (or resumed),
    `workers` at a time in worker processes, or here one after another when `workers` is 1 or one run is left.
    A run that fails is raised (side by side: once the others are done, since they are under way), or, given
    `errors`, appended there ("NAME: message") with None for its summary while the others go on."""
    summaries: list[dict[str, Any] | None] = [j.run_dir.finished(j.config.run_hash()) for j in jobs]
    todo = [i for i, s in enumerate(summaries) if s is None]
    workers = min(workers, len(todo))
    failure: BaseException | None = None

    def failed(i: int, exc: BaseException) -> None:
        nonlocal failure
        log(f"== {jobs[i].name} failed: {exc}")
        if errors is None:
            failure = failure or exc
        else:
            errors.append(f"{jobs[i].name}: {exc}")

    if workers <= 1:
        for i in todo:
            log(f"== {jobs[i].name}")
            try:
                summaries[i] = run_job(jobs[i].config, jobs[i].run_dir, log, progress, jobs[i].loop)
            except Exception as exc:
                if errors is None:
                    raise
                failed(i, exc)
        return summaries
    names = [jobs[i].name for i in todo]
    log(f"== side by side, {workers} at a time (one thread each; --jobs 1: one after another): "
        + (", ".join(names) if len(names) <= 4 else f"{len(names)} runs, {names[0]} ... {names[-1]}"))
    pool = _pool(workers)
    futures = {pool.submit(_run_in_worker, jobs[i].name, jobs[i].config.to_dict(), str(jobs[i].run_dir.root)): i
               for i in todo}
    try:
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            try:
                summaries[i] = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                raise
            except Exception as exc:  # noqa: BLE001 - the others are under way; raised once they are done
                failed(i, exc)
                continue
            log(f"== {jobs[i].name} finished")
    except BaseException:
        shutdown_workers()
        raise
    if failure is not None:
        raise failure
    return summaries


def run_job(cfg: Config, run_dir: RunDir, log: Callable[[str], None], progress: bool, loop=None) -> dict[str, Any]:
    """One job, here: a run of the level loop (on `loop` when it is prepared), or a whole experiment when its
    config has students or seeds."""
    from dsd2.run.experiment import run_experiment, run_once

    if cfg.distill.students or cfg.seeds:
        return run_experiment(cfg, run_dir, progress=progress, log=log)
    return run_once(cfg, run_dir, log, progress=progress, loop=loop)


_POOL: list[tuple[int, concurrent.futures.ProcessPoolExecutor]] = []  # (size, workers), kept for the next batch


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """`workers` worker processes, started once per process and size (a worker imports torch and dsd2 once, and
    the experiment's second batch reuses the first's)."""
    if _POOL and _POOL[0][0] != workers:
        shutdown_workers()
    if not _POOL:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP pool inherited across fork
        _POOL.append((workers, concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                                      initializer=_start_worker)))
    return _POOL[0][1]


@atexit.register
def shutdown_workers() -> None:
    """Stop the worker processes: queued runs are dropped and runs under way are waited for (a Ctrl-C reaches
    the workers too and stops them; their runs resume like any killed run)."""
    while _POOL:
        _POOL.pop()[1].shutdown(wait=True, cancel_futures=True)


def _start_worker() -> None:
    """A worker's setup: one thread (its runs are small CPU runs, which compute at one thread anyway, and a worker
    that plans must not plan workers of its own), and death with the process that started it (a killed `train`
    leaves no run writing on behind it, so `--resume` never meets a second writer)."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the call above
            raise SystemExit(1)


def _run_in_worker(name: str, config: dict[str, Any], path: str) -> dict[str, Any]:
    from dsd2.config import from_dict

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    return run_job(from_dict(config), RunDir(Path(path)), log, progress=False)
