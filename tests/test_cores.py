"""How runs use the cores (dsd2/run/cores.py): an MLP run on the CPU computes at one thread whatever the process
has, and independent runs side by side give the numbers, files and resume of the same runs one after another."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import engine_env

from dsd2.config import ConfigError, validate
from dsd2.run import run_experiment
from dsd2.run.cores import Job, phase_workers, plan_workers, run_jobs, run_threads, shutdown_workers
from dsd2.runs import VOLATILE_METRICS, RunDir
from dsd2.training.precision import concrete_precision

TWO_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="side by side needs two cores")


def results(root: Path) -> dict[str, list[dict]]:
    """Every metrics and epochs row under `root`, by file, without the fields that measure time."""
    out = {}
    for path in sorted(root.rglob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[str(path.relative_to(root))] = [{k: v for k, v in r.items() if k not in VOLATILE_METRICS} for r in rows]
    return out


@pytest.fixture(autouse=True)
def _no_workers_left():
    yield
    shutdown_workers()


def test_an_mlp_on_the_cpu_computes_at_one_thread(tiny_config):
    assert run_threads(tiny_config()) == 1
    torch.set_num_threads(2)
    cfg = tiny_config()
    vgg = replace(cfg, model=replace(cfg.model, name="vgg"), distill=replace(cfg.distill, student_model="vgg"))
    assert run_threads(vgg) == 2 and plan_workers(vgg) == 1
    assert run_threads(replace(cfg, distill=replace(cfg.distill, student_model="vgg"))) == 2  # students count too
    assert run_threads(replace(cfg, model=replace(cfg.model, name="lenet300"))) == 1
    assert run_threads(replace(cfg, device="cuda")) == 2


def test_workers_are_one_per_core_and_capped_by_jobs(tiny_config):
    torch.set_num_threads(2)
    assert plan_workers(tiny_config()) == 2
    assert plan_workers(tiny_config(jobs=1)) == 1
    assert plan_workers(tiny_config(jobs=8)) == 2
    with pytest.raises(ConfigError, match="jobs -1 must be 0"):
        validate(tiny_config(jobs=-1))


@TWO_CORES
def test_a_phase_goes_side_by_side_as_far_as_its_runs_still_to_run_allow(tmp_path, tiny_config):
    torch.set_num_threads(2)
    cfg = tiny_config()
    conv = replace(cfg, model=replace(cfg.model, name="lenet5"), distill=replace(cfg.distill, students=()))
    student = replace(cfg, distill=replace(cfg.distill, students=()))
    teacher_job = Job("teacher", conv, RunDir(tmp_path / "teacher"))
    students = [Job(f"s{i}", replace(student, seed=i), RunDir(tmp_path / f"s{i}")) for i in range(3)]
    assert phase_workers(students) == 2 and phase_workers([teacher_job, *students]) == 1
    assert phase_workers([]) == 1
    (tmp_path / "teacher").mkdir()  # the conv teacher finished (as `finished` reads a run): its students' turn
    (tmp_path / "teacher" / "summary.json").write_text(json.dumps({"finished": True, "run_hash": conv.run_hash()}))
    assert teacher_job.run_dir.finished(conv.run_hash()) is not None
    assert phase_workers([teacher_job, *students]) == 2


def test_an_mlp_run_does_not_depend_on_the_thread_count(tmp_path, tiny_config):
    cfg = tiny_config(distill__students=())
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run_experiment(cfg, RunDir(tmp_path / f"t{threads}"), progress=False, log=lambda s: None)
        assert torch.get_num_threads() == threads  # restored after the run
    assert results(tmp_path / "t1") == results(tmp_path / "t2") != {}


@TWO_CORES
@pytest.mark.slow
def test_side_by_side_is_one_after_another(tmp_path, tiny_config):
    """The seeds of an experiment (teacher, vanilla and both distilled students each): every row of every run."""
    torch.set_num_threads(2)
    lines: list[str] = []
    for jobs in (1, 2):
        cfg = tiny_config(seeds=(0, 1), jobs=jobs, optim__epochs=1, optim__dense_epochs=1, prune__levels=2)
        run_experiment(cfg, RunDir(tmp_path / f"jobs{jobs}"), progress=False, log=lines.append)
    assert any(line.startswith("== side by side, 2 at a time") for line in lines)
    one, two = results(tmp_path / "jobs1"), results(tmp_path / "jobs2")
    assert one == two and len(one) == 2 * 4 * 2  # 2 seeds x 4 runs x (metrics, epochs)
    summaries = [json.loads((tmp_path / f"jobs{j}" / "summary.json").read_text().replace(f"jobs{j}", "X"))
                 for j in (1, 2)]
    assert summaries[0] == summaries[1]


def test_a_finished_run_is_not_started_and_a_failure_waits_for_the_others(tmp_path, tiny_config):
    cfg = concrete_precision(tiny_config(distill__students=()))
    done = run_experiment(cfg, RunDir(tmp_path / "done"), progress=False, log=lambda s: None)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    jobs = [Job("done", cfg, RunDir(tmp_path / "done")), Job("bad", cfg, RunDir(blocker / "run")),
            Job("fresh", replace(cfg, seed=1), RunDir(tmp_path / "fresh"))]
    errors: list[str] = []
    summaries = run_jobs(jobs, 2, progress=False, log=lambda s: None, errors=errors)
    assert summaries[0] == done and summaries[1] is None and summaries[2]["finished"]
    assert len(errors) == 1 and errors[0].startswith("bad: ") and "Not a directory" in errors[0]
    with pytest.raises(Exception, match="Not a directory"):
        run_jobs(jobs[1:2] + [Job("other", replace(cfg, seed=2), RunDir(tmp_path / "other"))], 2, progress=False,
                 log=lambda s: None)
    assert RunDir(tmp_path / "other").finished(replace(cfg, seed=2).run_hash())  # it finished before the raise


@TWO_CORES
@pytest.mark.slow
def test_side_by_side_survives_sigkill_and_resumes(tmp_path):
    """kill -9 of `train --seeds` while both workers train: no worker writes on, and the resumed runs equal
    uninterrupted ones."""
    args = ["train", "--epochs", "2", "--dense-epochs", "2", "--levels", "3", "--students", "none",
            "--seeds", "0,1", "--quiet"]
    env = dict(engine_env(), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "dsd2"]
    subprocess.run([*cmd, *args, "--jobs", "1", "--out", str(tmp_path / "whole")], env=env, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
            (killed / f"seed-{s}" / "epochs.jsonl").exists() for s in (0, 1)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    time.sleep(1.0)
    files = {p: p.stat().st_mtime_ns for p in killed.rglob("*") if p.is_file()}
    time.sleep(2.0)
    assert {p: p.stat().st_mtime_ns for p in killed.rglob("*") if p.is_file()} == files  # nobody writes on
    subprocess.run([*cmd, "train", "--resume", str(killed)], env=env, check=True, capture_output=True)
    assert results(killed) == results(tmp_path / "whole") != {}
