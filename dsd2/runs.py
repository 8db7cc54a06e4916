"""The run directory: resolved config, metrics, checkpoints, summary. Every write is atomic.

Layout of a run directory:
    config.yaml         the resolved config (with its hash)
    noise.safetensors   corrupted training indices and their original labels
    metrics.jsonl       one JSON object per completed level
    epochs.jsonl        one JSON object per completed epoch
    checkpoints/level_XX.safetensors   weights, masks, optimizer state at the end of each level
    checkpoints/last.safetensors       the last completed epoch (for resume)
    checkpoints/init.safetensors       the initial weights (for rewinding)
    summary.json        written when the run finishes

The main job's directory (an experiment root) holds its own config.yaml and summary.json, plus `teacher/` and
`students/<kind>/`, each a run directory. `resolve_runs` / `resolve_run` turn any path a user gives a command
(a run, an experiment root, a folder of runs) into the run directories the command needs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "dsd2-checkpoint-v1"
# metrics fields that measure time, not results: they differ between identical runs
VOLATILE_METRICS = frozenset({"wall_time_s", "train_time_s", "images_per_s", "achieved_flop_per_s"})


class RunError(ValueError):
    """A run directory or checkpoint problem a user must fix; the message names the path."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    if path.parent.exists() and not path.parent.is_dir():
        raise RunError(f"'{path.parent}' is a file, not a folder; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes files private; run files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"'{path}' line {n} is not valid JSON; the run directory is damaged") from None
    return rows


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """safetensors file with our format tag and JSON metadata; loading it never executes code."""
    from safetensors.torch import save

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(flat, metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, data)


def load_checkpoint(path: Path, expect_hash: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise RunError(f"checkpoint '{path}' is corrupt or not a safetensors file ({exc.__class__.__name__}); "
                       "restore it, or start the run again in a new --out") from None
    if header.get("format") != FORMAT:
        raise RunError(f"checkpoint '{path}' is not a dsd2 checkpoint (format {header.get('format')!r})")
    meta = json.loads(header.get("meta", "{}"))
    if expect_hash is not None and meta.get("run_hash") != expect_hash:
        raise RunError(f"checkpoint '{path}' belongs to run {meta.get('run_hash')!r}, not {expect_hash!r}")
    return tensors, meta


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config_path = property(lambda self: self.root / "config.yaml")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    epochs_path = property(lambda self: self.root / "epochs.jsonl")
    summary_path = property(lambda self: self.root / "summary.json")
    noise_path = property(lambda self: self.root / "noise.safetensors")
    ckpt_dir = property(lambda self: self.root / "checkpoints")
    last_path = property(lambda self: self.root / "checkpoints" / "last.safetensors")
    init_path = property(lambda self: self.root / "checkpoints" / "init.safetensors")

    def level_path(self, level: int) -> Path:
        return self.ckpt_dir / f"level_{level:02d}.safetensors"

    def stored_config(self) -> dict[str, Any] | None:
        import yaml

        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"'{self.root}' is a file, not a run folder")
        if not self.config_path.exists():
            return None
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError:
            raise RunError(f"'{self.config_path}' is not valid YAML; the run directory is damaged") from None
        if not isinstance(data, dict) or "run_hash" not in data or "config" not in data:
            raise RunError(f"'{self.config_path}' is not a dsd2 run config")
        return data

    def claim(self, config: dict[str, Any], run_hash: str, write: bool = True) -> bool:
        """Make the directory ours. Returns True when it already holds this run (resume). With
        `write=False` (data-parallel ranks other than 0) only check, never write."""
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"output '{self.root}' is a file, not a folder; choose another --out")
        stored = self.stored_config()
        if stored is not None:
            if stored["run_hash"] != run_hash:
                raise RunError(f"output folder '{self.root}' holds a different run ({stored['run_hash']}, "
                               f"this one is {run_hash}); choose another --out or --resume it")
            return True
        if self.root.exists() and any(self.root.iterdir()):
            raise RunError(f"output folder '{self.root}' is not empty and holds no dsd2 run; choose another --out")
        if not write:
            return False
        import yaml

        text = yaml.safe_dump({"run_hash": run_hash, "config": config}, sort_keys=False)
        atomic_write_text(self.config_path, text)
        return False

    def levels(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        try:
            data = json.loads(self.summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"'{self.summary_path}' is not valid JSON; the run directory is damaged") from None
        if not isinstance(data, dict):
            raise RunError(f"'{self.summary_path}' is not a dsd2 summary")
        return data

    def finished(self, run_hash: str) -> dict[str, Any] | None:
        """The summary when this directory holds a finished run of `run_hash`, else None: the one answer to
        "is this run done?" (the CLI, sweeps and the experiment's parts skip such a run)."""
        summary = self.summary()
        if summary is None or not summary.get("finished") or summary.get("run_hash") != run_hash:
            return None
        return summary

    def is_experiment(self) -> bool:
        """True for the root of a DSD² experiment: a config.yaml with a teacher/ folder beside it (a run of the
        level loop never has one, whatever its config says about students)."""
        return self.config_path.is_file() and (self.root / "teacher").is_dir()

    def seed_runs(self) -> list[RunDir]:
        """The root of a configuration run over seeds (`--seeds`) holds one run per seed in seed-S/: those that
        exist, in the config's order; [] for any other directory."""
        stored = self.stored_config() or {"config": {}}
        seeds = stored["config"].get("seeds") or ()
        return [run for run in (RunDir(self.root / f"seed-{s}") for s in seeds) if run.config_path.is_file()]

    def parts(self) -> dict[str, RunDir]:
        """An experiment's runs that exist (hold a config.yaml), by name: teacher, then each student kind in the
        config's order (any other folder in students/ after them, by name)."""
        stored = self.stored_config() or {"config": {}}
        kinds = list((stored["config"].get("distill") or {}).get("students") or ())
        students = self.root / "students"
        kinds += sorted(p.name for p in students.iterdir() if p.name not in kinds) if students.is_dir() else []
        named = {"teacher": RunDir(self.root / "teacher"), **{k: RunDir(students / k) for k in kinds}}
        return {name: run for name, run in named.items() if run.config_path.is_file()}


# What a path given to a command resolves to, by the role the command needs:
#   "levels"      every run that holds level checkpoints (entropy, the report of single runs): a run directory is
#                 itself; an experiment root gives teacher/, then students/<kind>/ in the experiment's order
#   "teacher"     the run a student is distilled from: a run directory is itself; an experiment root gives teacher/
#   "experiment"  what `train --resume` continues and `report` aggregates: a run directory or an experiment root is
#                 itself
# The root of a run over seeds (`--seeds`) is itself for "experiment"; for the other roles, what each seed-S/ gives.
# A folder that is not a run (runs/, a sweep's folder, ROOT/students) gives what each folder directly inside it
# resolves to, in name order.
RESOLVE_ROLES = ("levels", "teacher", "experiment")


def _resolve_here(path: Path, role: str) -> list[RunDir] | None:
    """What `path` itself resolves to for `role`; None when it holds no run (no config.yaml)."""
    run = RunDir(path)
    if not run.config_path.is_file():
        return None
    if role == "experiment":
        return [run]
    seeds = run.seed_runs()
    if seeds:
        return [found for sub in seeds for found in _resolve_here(sub.root, role) or []]
    if not run.is_experiment():
        return [run]
    parts = run.parts()
    if role == "teacher":
        if "teacher" not in parts:
            raise RunError(f"experiment '{path}' has no teacher run yet (no config.yaml in {path / 'teacher'})")
        return [parts["teacher"]]
    return list(parts.values())


def resolve_runs(path: str | Path, role: str = "levels") -> list[RunDir]:
    """The run directories that `path` names for `role` (see RESOLVE_ROLES); at least one, else a RunError
    naming the path."""
    if role not in RESOLVE_ROLES:
        raise ValueError(f"role '{role}' is not known; allowed: {', '.join(RESOLVE_ROLES)}")
    root = Path(path)
    if not root.exists():
        raise RunError(f"'{root}' does not exist")
    if not root.is_dir():
        raise RunError(f"'{root}' is a file, not a run folder")
    found = _resolve_here(root, role)
    if found is None:  # a folder of runs
        children = sorted(p for p in root.iterdir() if p.is_dir())
        found = [run for child in children for run in (_resolve_here(child, role) or [])]
    if not found:
        raise RunError(f"'{root}' holds no dsd2 run yet (no config.yaml in it, in its teacher/ or students/<kind>/, "
                       "or in the folders directly inside it)")
    return found


def resolve_run(path: str | Path, role: str) -> RunDir:
    """The one run directory that `path` names for `role`; a RunError listing the candidates when it holds
    several."""
    runs = resolve_runs(path, role)
    if len(runs) > 1:
        raise RunError(f"'{path}' holds {len(runs)} runs, so name one of them: "
                       f"{', '.join(str(r.root) for r in runs)}")
    return runs[0]
