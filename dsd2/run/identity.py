"""Runs written by release 0.1.0, found under today's run hash: their files re-labelled, their folders renamed.

Release 0.1.0 hashed every config field, so each new field renamed every run. Today's hash covers only the fields
that differ from their defaults (`Config.run_hash`). A 0.1.0 run is recognised by its own config.yaml: the hash
stored there is 0.1.0's hash of the config stored beside it (`legacy_run_hash`). Upgrading it rewrites the hash in
its checkpoints, summary and config.yaml (last: a run killed while being upgraded is upgraded again), translates a
student's `teacher_id` to its teacher's new hash, and keeps the old hash as `upgraded_from`. Nothing is retrained.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dsd2.config import Config, from_dict, legacy_run_hash
from dsd2.runs import RunDir, atomic_write_text, load_checkpoint, save_checkpoint, write_json

# sub-folders of a run that hold files, not runs
_NOT_RUNS = frozenset({"checkpoints", "report"})


def find_run_folder(cfg: Config, path: Path, legacy_hash: str | None = None, log=print) -> Path:
    """`path`, a default folder whose name holds the run hash, after renaming into it the folder 0.1.0 named by
    its hash (`legacy_hash`: the config's own by default) when only that one exists, and upgrading its runs."""
    legacy_hash = legacy_hash or cfg.legacy_run_hash()
    old = path.with_name(path.name.replace(cfg.run_hash(), legacy_hash))
    if not path.exists() and old != path and old.is_dir():
        old.rename(path)
        log(f"renamed {old} to {path}: since 0.2.0 a run's name hashes only its fields that differ from the defaults")
    upgrade_runs(path, {legacy_hash: cfg.run_hash()})
    return path


def upgrade_runs(root: str | Path, renames: dict[str, str] | None = None) -> dict[str, str]:
    """Upgrade every 0.1.0 run at or below `root` (teachers before the students that name them) and return the
    hash renames, old to new, `renames` (already known ones) included."""
    renames = dict(renames or {})
    runs = [RunDir(p.parent) for p in sorted(Path(root).rglob("config.yaml"))
            if not _NOT_RUNS.intersection(p.relative_to(root).parts[:-1])]
    stored = {run.root: run.stored_config() for run in runs if _is_legacy(run)}
    # runs that name no teacher first, so every teacher's new hash is known before its students are upgraded
    order = sorted(stored, key=lambda r: bool((stored[r]["config"].get("distill") or {}).get("teacher_id")))
    for path in order:
        upgraded = _upgrade_run(RunDir(path), stored[path], renames)
        if upgraded is not None:
            renames[upgraded[0]] = upgraded[1]
    return renames


def _is_legacy(run: RunDir) -> bool:
    try:
        stored = run.stored_config()
    except ValueError:  # a damaged config.yaml: the command that reads the run says so
        return False
    return stored is not None and stored["run_hash"] == legacy_run_hash(stored["config"])


def _teacher_hash(config: dict[str, Any], old_hash: str, renames: dict[str, str]) -> str | None:
    """Today's hash of the teacher 0.1.0 knew as `old_hash`: from the renames so far, else from its folder."""
    if old_hash in renames:
        return renames[old_hash]
    spec = (config.get("distill") or {}).get("teacher") or ""
    path = spec.rpartition(":")[0]
    teacher = RunDir(path) if path else None
    if teacher is None or not teacher.config_path.is_file():
        return None
    stored = teacher.stored_config()
    if stored.get("upgraded_from") == old_hash:
        return stored["run_hash"]
    if stored["run_hash"] == old_hash and _is_legacy(teacher):
        return from_dict(stored["config"]).run_hash()
    return None


def _upgrade_run(run: RunDir, stored: dict[str, Any], renames: dict[str, str]) -> tuple[str, str] | None:
    old, config = stored["run_hash"], copy.deepcopy(stored["config"])
    distill = config.get("distill") or {}
    if distill.get("teacher_id") and not distill["teacher_id"].startswith("custom:"):
        teacher_old, _, level = distill["teacher_id"].partition(":")
        teacher_new = _teacher_hash(config, teacher_old, renames)
        if teacher_new is None:  # its teacher is gone: the run stays as it is (and is found by no new command)
            return None
        distill["teacher_id"] = f"{teacher_new}:{level}"
    new = from_dict(config).run_hash()
    for path in sorted(run.ckpt_dir.glob("*.safetensors")) + [run.noise_path]:
        if path.is_file():
            tensors, meta = load_checkpoint(path)
            if meta.get("run_hash") == old:
                save_checkpoint(path, tensors, {**meta, "run_hash": new})
    summary = run.summary()
    if summary is not None and summary.get("run_hash") == old:
        write_json(run.summary_path, {**summary, "run_hash": new})
    import yaml

    text = yaml.safe_dump({"run_hash": new, "config": config, "upgraded_from": old}, sort_keys=False)
    atomic_write_text(run.config_path, text)
    return old, new


def upgraded_json(path: Path, key: str, renames: dict[str, str]) -> None:
    """Rewrite the hash under `key` of a JSON record (a study's study.json) that names an upgraded run."""
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get(key) in renames:
            write_json(path, {**record, key: renames[record[key]]})
