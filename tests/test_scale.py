"""Scale-out: torchrun data parallelism (gloo on the CPU), rank-0-only writes, sweeps and their launchers."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import engine_env

from dsd2.config import ConfigError, build_config
from dsd2.run import LevelLoop
from dsd2.runs import RunDir, read_jsonl
from dsd2.sweep import expand, parse_grid, run_dir_for, run_sweep
from dsd2.training import distributed

FLAGS = ["train", "--epochs", "6", "--dense-epochs", "6", "--levels", "3", "--quiet", "--students", "none",
         "--seed", "3", "--checkpoint-every", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsd2"]
# how a row was computed, not what: times, and the masked layers' paths (fused, dense or sparse)
VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "achieved_flop_per_s", "kernels"}


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def run(cmd, cwd, **kw):
    env = dict(engine_env(), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """The MLP has no BatchNorm, so two ranks with half batches each differ from one process only by the
    order of floating-point sums: accuracies within 1 point, losses within 0.1 %, same sparsity."""
    two = run([*TORCHRUN, *FLAGS, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one = run([sys.executable, "-m", "dsd2", *FLAGS, "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["level"] for r in a] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        assert x["sparsity"] == y["sparsity"]
        for key in ("train_acc", "val_acc", "test_acc"):
            assert abs(x[key] - y[key]) <= 0.01, key
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-3)
        assert x["entropy_mean"] == pytest.approx(y["entropy_mean"], abs=5e-3)
    assert two.stdout.count("best: best level") == 1  # one rank speaks


@pytest.mark.slow
def test_killing_one_worker_then_resuming(tmp_path):
    ref = run([*TORCHRUN, *FLAGS, "--out", str(tmp_path / "ref")], tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    env = dict(engine_env(), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TORCHRUN, *FLAGS, "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(out / "epochs.jsonl") if (out / "epochs.jsonl").exists() else []
        if any(r["level"] == 1 and r["epoch"] >= 2 for r in rows):
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert workers, "no worker processes found"
            os.kill(int(workers[-1]), signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=120)
    assert killed and proc.returncode != 0
    assert not (out / "summary.json").exists()
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    resumed = run([*TORCHRUN, *FLAGS, "--out", str(out)], tmp_path)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout
    assert stable(read_jsonl(out / "metrics.jsonl")) == stable(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    # the same checkpoint also resumes with a different number of processes
    single = run([sys.executable, "-m", "dsd2", *FLAGS, "--out", str(partial)], tmp_path)
    assert single.returncode == 0 and "resuming" in single.stdout
    assert len(read_jsonl(partial / "metrics.jsonl")) == 4


@pytest.mark.slow
def test_only_rank_zero_writes(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config()
    path = tmp_path / "run"
    engine = LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None)
    saves = {"n": 0}
    original = engine.save_state

    def crash(*args, **kwargs):
        original(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 6:
            raise KeyboardInterrupt

    engine.save_state = crash
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistContext(rank=1, world=1))
    summary = LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None).run()
    assert summary["levels"] == 4  # it trained the remaining levels...
    after = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before  # ...and wrote nothing


def test_grid_expansion_and_hash_named_directories(tmp_path):
    base = build_config(overrides={"optim": {"epochs": 1, "dense_epochs": 1}, "prune": {"levels": 1},
                                   "distill": {"students": []}})
    grid = parse_grid(["noise=0.1,0.2,0.5", "seed=0,1", "optim.lr=0.001"])
    assert grid == {"data.noise": [0.1, 0.2, 0.5], "seed": [0, 1], "optim.lr": [0.001]}
    configs = expand(base, grid)
    assert len(configs) == 6 and len({c.run_hash() for c in configs}) == 6
    again = expand(base, grid)
    assert [run_dir_for(tmp_path, c) for c in configs] == [run_dir_for(tmp_path, c) for c in again]
    assert {(c.data.noise, c.seed) for c in configs} == {(n, s) for n in (0.1, 0.2, 0.5) for s in (0, 1)}
    with pytest.raises(ConfigError, match="unknown config key 'data.bogus'"):
        expand(base, parse_grid(["data.bogus=1"]))
    with pytest.raises(ConfigError, match="noise 1.5 is outside"):
        expand(base, parse_grid(["noise=1.5"]))
    with pytest.raises(ConfigError, match="is not KEY=V1"):
        parse_grid(["noise"])


@pytest.mark.slow
def test_sweep_skips_finished_runs_and_summarises_seeds(tmp_path):
    base = build_config(overrides={"optim": {"epochs": 1, "dense_epochs": 1}, "prune": {"levels": 1},
                                   "distill": {"students": []}})
    logs = []
    summary = run_sweep(base, ["noise=0.2,0.5", "seed=0,1"], tmp_path / "sw", log=logs.append)
    assert summary["finished"] == 4 and len(summary["groups"]) == 2
    assert all(len(g["runs"]) == 2 for g in summary["groups"])
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| 0.2 | 2 |" in table and "| 0.5 | 2 |" in table
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("metrics.jsonl")}
    logs.clear()
    run_sweep(base, ["noise=0.2,0.5", "seed=0,1"], tmp_path / "sw", log=logs.append)
    assert "4 finished, 0 to run" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").rglob("metrics.jsonl")} == stamps


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    base = build_config(overrides={"optim": {"epochs": 1, "dense_epochs": 1}, "prune": {"levels": 1},
                                   "distill": {"students": []}})
    summary = run_sweep(base, ["seed=0,1"], tmp_path / "sw", launcher="submitit-local", log=lambda s: None)
    assert summary["finished"] == 2
    assert list((tmp_path / "sw" / "submitit").glob("*_result.pkl"))
    with pytest.raises(ConfigError, match="launcher 'pbs'"):
        run_sweep(base, ["seed=0"], tmp_path / "sw2", launcher="pbs", log=lambda s: None)


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_sweep(tmp_path):
    from dsd2.runs import RunError

    base = build_config(overrides={"optim": {"epochs": 1, "dense_epochs": 1}, "prune": {"levels": 1},
                                   "distill": {"students": []}})
    with pytest.raises(RunError, match="1 of 2 sweep runs failed"):
        run_sweep(base, ["levels=200,1"], tmp_path / "sw", log=lambda s: None)
    assert "| 1 | 1 |" in (tmp_path / "sw" / "sweep.md").read_text()
