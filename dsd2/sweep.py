"""Sweeps over noise, seeds, depth, width, ...: a grid expanded into runs named by the hash of their config.

A finished run (its summary carries its hash) is skipped, so a killed sweep resumes by running the same
command. Launchers: `local` runs them one after another in this process, or one per visible GPU in
subprocesses; `slurm` submits each run as a job through submitit; `submitit-local` uses submitit's local
executor (the same code path without a cluster, for tests and single machines).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dsd2.config import LAUNCHERS, Config, ConfigError, build_config, config_options, from_dict, merge
from dsd2.run.cores import Job, phase_workers, run_jobs
from dsd2.run.identity import find_run_folder
from dsd2.runs import RunDir, RunError, atomic_write_text, write_json
from dsd2.training.precision import concrete_precision

# short grid names: every flag's (noise, noise_type, lr, ...) and the paper's delta and gamma for the VGG-like
# network's depth and width; any dotted config path also works (e.g. optim.lr)
ALIASES = {
    **{opt.dest: opt.path for opt in config_options() if opt.dest is not None},
    "delta": "model.depth", "gamma": "model.width",
}


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['noise=0.1,0.2', 'seed=0,1'] -> {'data.noise': [0.1, 0.2], 'seed': [0, 1]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"grid '{item}' is not KEY=V1,V2,...")
        key = key.strip()
        path = ALIASES.get(key.replace("-", "_"), key)
        grid[path] = [_parse_value(v.strip()) for v in values.split(",")]
    return grid


def _nested(path: str, value: Any) -> dict[str, Any]:
    parts = path.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def expand(base: Config, grid: dict[str, list[Any]]) -> list[Config]:
    """Every combination of the grid applied to `base`; unknown keys and bad values fail like flags do."""
    raw = asdict(base)
    configs, seen = [], set()
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        override: dict[str, Any] = {}
        for key, value in zip(keys, combo):
            override = merge(override, _nested(key, value))
        cfg = concrete_precision(from_dict(merge(raw, override)))  # `auto` decided for each run's own model
        if cfg.run_hash() not in seen:
            seen.add(cfg.run_hash())
            configs.append(cfg)
    return configs


def run_dir_for(root: Path, cfg: Config) -> Path:
    return root / cfg.run_hash()


def run_one(config: dict[str, Any], path: str) -> dict[str, Any]:
    """Run (or resume) one configuration; the entry point of every launcher, picklable for submitit."""
    from dsd2.run import run_experiment

    cfg = from_dict(config)
    return run_experiment(cfg, RunDir(path), progress=False, log=lambda message: None)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime: CPU sweep
        return 0


def launch(configs: list[Config], root: Path, launcher: str, log=print,
           slurm: dict[str, Any] | None = None) -> list[str]:
    """Run what is not finished; one failed run does not stop the others. Returns the failures."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher '{launcher}' is not known; allowed: {', '.join(LAUNCHERS)}")
    placed = [(c, find_run_folder(c, run_dir_for(root, c), log=log)) for c in configs]
    todo = [(c, path) for c, path in placed if RunDir(path).finished(c.run_hash()) is None]
    log(f"sweep: {len(configs)} runs, {len(configs) - len(todo)} finished, {len(todo)} to run")
    failures: list[str] = []
    if not todo:
        return failures
    if launcher == "local":
        gpus = _gpu_count()
        if gpus > 1:
            return _local_per_gpu(todo, gpus, log)
        jobs = [Job(path.name, cfg, RunDir(path)) for cfg, path in todo]
        workers = phase_workers(jobs)
        if workers > 1:  # small CPU runs: one per core, each in its own process
            run_jobs(jobs, workers, log=log, errors=failures)
            return failures
        for cfg, path in todo:
            log(f"  run {path.name}")
            try:
                run_one(cfg.to_dict(), str(path))
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                failures.append(f"{path.name}: {exc}")
                log(f"  run {path.name} failed: {exc}")
        return failures
    import submitit

    folder = root / "submitit"
    if launcher == "slurm":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        executor.update_parameters(**(slurm or {}))
    else:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=(slurm or {}).get("timeout_min", 60))
    jobs = [(path, executor.submit(run_one, cfg.to_dict(), str(path))) for cfg, path in todo]
    log(f"  submitted {len(jobs)} jobs ({launcher}); logs in {folder}")
    for path, job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - submitit wraps the run's error; recorded, the sweep goes on
            failures.append(f"{path.name}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
    return failures


def _local_per_gpu(todo: list[tuple[Config, Path]], gpus: int, log) -> list[str]:
    """One run per visible GPU at a time, each in its own process."""
    import time

    pending = list(todo)
    failures: list[str] = []
    running: dict[int, tuple[subprocess.Popen, Path]] = {}
    code = "import json,sys; from dsd2.sweep import run_one; run_one(json.loads(sys.argv[1]), sys.argv[2])"
    while pending or running:
        for gpu in range(gpus):
            proc, path = running.get(gpu, (None, None))
            if proc is not None and proc.poll() is not None:
                if proc.returncode != 0:
                    failures.append(f"{path.name}: exit code {proc.returncode} on GPU {gpu}")
                del running[gpu]
            if gpu not in running and pending:
                cfg, path = pending.pop(0)
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
                proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(path)], env=env)
                running[gpu] = (proc, path)
                log(f"  run {path.name} on GPU {gpu}")
        time.sleep(1.0)
    return failures


def summarize(configs: list[Config], root: Path) -> dict[str, Any]:
    """Aggregate the sweep's finished runs: seeds of one configuration to mean ± std of the returned model."""
    groups: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        path = run_dir_for(root, cfg)
        summary = RunDir(path).finished(cfg.run_hash())
        if summary is None:
            continue
        d = cfg.to_dict()
        d.pop("seed")
        key = json.dumps(d, sort_keys=True)
        g = groups.setdefault(key, {"config": d, "runs": [], "best_test_acc": [], "best_sparsity": [],
                                    "train_pflops_dense": []})
        g["runs"].append(str(path))
        g["best_test_acc"].append(summary["best_test_acc"])
        g["best_sparsity"].append(summary["best_sparsity"])
        g["train_pflops_dense"].append(curve_pflops(summary))
    rows = []
    for g in groups.values():
        accs = g["best_test_acc"]
        rows.append({**g, "mean_test_acc": statistics.fmean(accs),
                     "std_test_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    out = {"runs": len(configs), "finished": sum(len(g["runs"]) for g in groups.values()), "groups": rows}
    write_json(root / "sweep_summary.json", out)
    return out


def curve_pflops(summary: dict[str, Any]) -> float:
    """Training PFLOPs (dense) of the curve whose w_best a run's summary reports: the run's own, or an
    experiment's teacher's; NaN when the summary does not say."""
    part = summary.get("teacher", {}) if "students" in summary else summary
    return float(part.get("train_pflops_dense", float("nan")))


def sweep_table(summary: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    from dsd2.report.units import format_pflops

    keys = [k for k in grid if k != "seed"]
    lines = [f"| {' | '.join(keys)} | seeds | test acc of w_best (mean ± std) | sparsity | training (dense, 1/MAC) |",
             f"|{'---|' * (len(keys) + 4)}"]
    for g in summary["groups"]:
        vals = []
        for k in keys:
            node: Any = g["config"]
            for part in k.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            vals.append(str(node))
        lines.append(f"| {' | '.join(vals)} | {len(g['runs'])} | {g['mean_test_acc'] * 100:.2f} ± "
                     f"{g['std_test_acc'] * 100:.2f} | {statistics.fmean(g['best_sparsity']) * 100:.2f} % | "
                     f"{format_pflops(statistics.fmean(g.get('train_pflops_dense') or [float('nan')]))} |")
    return "\n".join(lines) + "\n"


def run_sweep(base: Config, grid_items: list[str], root: Path, launcher: str = "local", log=print,
              slurm: dict[str, Any] | None = None) -> dict[str, Any]:
    grid = parse_grid(grid_items)
    configs = expand(base, grid)
    root.mkdir(parents=True, exist_ok=True)
    failures = launch(configs, root, launcher, log, slurm)
    summary = summarize(configs, root)
    summary["failed"] = failures
    write_json(root / "sweep_summary.json", summary)
    atomic_write_text(root / "sweep.md", sweep_table(summary, grid))
    if failures:
        raise RunError(f"{len(failures)} of {len(configs)} sweep runs failed ({failures[0]}); the others are "
                       f"summarised in {root / 'sweep.md'}; rerun the sweep after fixing them")
    return summary


def base_config(config_path: str | None, preset: str | None, overrides: dict[str, Any]) -> Config:
    return build_config(preset, config_path, overrides)
