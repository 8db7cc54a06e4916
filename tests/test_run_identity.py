"""Run identity across upgrades: literal hashes pinned, and runs written by release 0.1.0 found and resumed.

tests/fixtures/runs-0.1.0 was written by dsd2 0.1.0 (commit 7a1c1d1): `digits-mlp-6eee02cfe14b/` is a finished DSD²
experiment (`dsd2-engine train --hidden 16,16 --student-hidden 16,16 --levels 2 --epochs 3 --dense-epochs 3`, its
report/ folder removed), `killed/` the same teacher's run stopped after the first epoch of level 1.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from dsd2.cli import main
from dsd2.config import Config, from_dict, identity_fields, legacy_run_hash
from dsd2.config import build_config as build_unresolved
from dsd2.run.identity import upgrade_runs
from dsd2.runs import load_checkpoint, read_jsonl
from dsd2.training.precision import concrete_precision

FIXTURE = Path(__file__).parent / "fixtures" / "runs-0.1.0"
OLD_ROOT = "digits-mlp-6eee02cfe14b"
FLAGS = ["--hidden", "16,16", "--student-hidden", "16,16", "--levels", "2", "--epochs", "3", "--dense-epochs", "3",
         "--quiet"]


def build_config(*args):
    """The config a command names: --precision auto decided for its model (fp32 for each of these on any CPU)."""
    return concrete_precision(build_unresolved(*args))


# ---- the hash -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, expected", [
    (Config(), "44136fa355b3"),
    (build_config(), "528c68cb9208"),  # the main job: val_fraction 1/6 and the resolved precision differ
    (build_config("digits-mlp-3seeds"), "c8fb5b5b7812"),
    (build_config("cifar10-resnet18", None, {"precision": "fp32"}), "c037c98d5875"),
    (build_config(None, None, {"data": {"noise": 0.2}, "model": {"hidden": (512, 512)}, "distill": {"students": ()}}),
     "f79873a332f9"),
], ids=["defaults", "main-job", "3seeds", "cifar10-resnet18", "mlp-512"])
def test_pinned_run_hashes(cfg, expected):
    # a changed value here renames every stored run of that config: only a deliberate change may do that
    assert cfg.run_hash() == expected


def test_the_hash_names_only_the_fields_that_differ_from_their_defaults():
    assert identity_fields(Config()) == {}
    assert identity_fields(build_config()) == {"data.val_fraction": 1 / 6, "precision": "fp32"}
    cfg = build_config(None, None, {"optim": {"epochs": 7}, "prune": {"include": ["layer*"]}})
    assert identity_fields(cfg) == {"data.val_fraction": 1 / 6, "precision": "fp32", "optim.epochs": 7,
                                    "prune.include": ["layer*"]}


def test_where_data_lives_and_how_results_are_judged_do_not_name_the_run():
    base = build_config()
    for changed in (dataclasses.replace(base, data=dataclasses.replace(base.data, data_root="/x", download=True)),
                    dataclasses.replace(base, analysis=dataclasses.replace(base.analysis, dodge_margin=0.02)),
                    dataclasses.replace(base, distill=dataclasses.replace(base.distill, teacher="/t:3"))):
        assert changed.run_hash() == base.run_hash()
    noisier = dataclasses.replace(base, data=dataclasses.replace(base.data, noise=0.2))
    assert noisier.run_hash() != base.run_hash()


def test_the_legacy_hash_is_what_0_1_0_stored():
    configs = sorted(FIXTURE.rglob("config.yaml"))
    assert len(configs) == 6
    for path in configs:
        stored = yaml.safe_load(path.read_text())
        assert legacy_run_hash(stored["config"]) == stored["run_hash"], path
        assert from_dict(stored["config"]).legacy_run_hash() == stored["run_hash"], path


# ---- 0.1.0's runs, found and resumed --------------------------------------------------------------------------

@pytest.fixture
def old_runs(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE / OLD_ROOT, tmp_path / "runs" / OLD_ROOT)
    shutil.copytree(FIXTURE / "killed", tmp_path / "killed")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def checkpoint_hashes(run: Path) -> set[str]:
    return {load_checkpoint(p)[1]["run_hash"] for p in [*run.glob("checkpoints/*.safetensors"),
                                                       run / "noise.safetensors"]}


@pytest.mark.slow
def test_a_finished_0_1_0_experiment_is_found_renamed_and_not_run_again(old_runs, capsys):
    old = old_runs / "runs" / OLD_ROOT
    before = {p.relative_to(old): p.read_text() for p in old.rglob("metrics.jsonl")}
    assert main(["train", *FLAGS]) == 0
    out = capsys.readouterr().out
    cfg = build_config(None, None, {"model": {"hidden": (16, 16)}, "distill": {"student_hidden": (16, 16)},
                                    "prune": {"levels": 2}, "optim": {"epochs": 3, "dense_epochs": 3}})
    new = old_runs / "runs" / f"digits-mlp-{cfg.run_hash()}"
    assert "run already complete" in out and not old.exists() and new.is_dir()
    assert {p.relative_to(new): p.read_text() for p in new.rglob("metrics.jsonl")} == before  # nothing retrained
    teacher = yaml.safe_load((new / "teacher" / "config.yaml").read_text())
    assert teacher["upgraded_from"] == "d59f66200736" and teacher["run_hash"] != "d59f66200736"
    for part in ["teacher", "students/vanilla", "students/kd-dense", "students/kd-sparse"]:
        stored = yaml.safe_load((new / part / "config.yaml").read_text())
        assert stored["run_hash"] == from_dict(stored["config"]).run_hash()
        assert checkpoint_hashes(new / part) == {stored["run_hash"]}
        assert json.loads((new / part / "summary.json").read_text())["run_hash"] == stored["run_hash"]
    sparse = yaml.safe_load((new / "students" / "kd-sparse" / "config.yaml").read_text())
    assert sparse["config"]["distill"]["teacher_id"] == f"{teacher['run_hash']}:2"
    # a second call finds the upgraded folder as it is
    assert main(["train", *FLAGS]) == 0
    assert "run already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_0_1_0_run_resumes_and_keeps_what_it_had(old_runs, capsys):
    killed = old_runs / "killed"
    levels, epochs = read_jsonl(killed / "metrics.jsonl"), read_jsonl(killed / "epochs.jsonl")
    assert [r["level"] for r in levels] == [0] and len(epochs) == 4
    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    assert "killed at level 1, epoch 1" in capsys.readouterr().out
    after_levels, after_epochs = read_jsonl(killed / "metrics.jsonl"), read_jsonl(killed / "epochs.jsonl")
    assert [r["level"] for r in after_levels] == [0, 1, 2] and len(after_epochs) == 9
    volatile = {"best"}  # the best level is marked once the run ends
    assert {k: v for k, v in after_levels[0].items() if k not in volatile} == levels[0]
    assert after_epochs[:4] == epochs  # the epochs trained before the kill are kept, not redone
    stored = yaml.safe_load((killed / "config.yaml").read_text())
    assert checkpoint_hashes(killed) == {stored["run_hash"]}


@pytest.mark.slow
def test_the_same_command_with_out_resumes_a_killed_0_1_0_run(old_runs, capsys):
    flags = ["--hidden", "16,16", "--levels", "2", "--epochs", "3", "--dense-epochs", "3", "--students", "none"]
    assert main(["train", *flags, "--quiet", "--out", "killed"]) == 0
    assert "killed at level 1, epoch 1" in capsys.readouterr().out


def test_a_student_whose_teacher_lives_elsewhere_is_upgraded_through_the_teacher_path(old_runs):
    root = old_runs / "runs" / OLD_ROOT
    student = root / "students" / "kd-sparse"
    stored = yaml.safe_load((student / "config.yaml").read_text())
    stored["config"]["distill"]["teacher"] = f"{root / 'teacher'}:2"  # the path 0.1.0 wrote was the fixture maker's
    (student / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    renames = upgrade_runs(root / "students")  # the teacher is outside this tree and is not upgraded itself
    teacher = yaml.safe_load((root / "teacher" / "config.yaml").read_text())
    assert teacher["run_hash"] == "d59f66200736"
    new_teacher = from_dict(teacher["config"]).run_hash()
    upgraded = yaml.safe_load((student / "config.yaml").read_text())
    assert upgraded["config"]["distill"]["teacher_id"] == f"{new_teacher}:2"
    assert renames[stored["run_hash"]] == upgraded["run_hash"]


def test_upgrading_twice_changes_nothing_more(old_runs):
    root = old_runs / "runs" / OLD_ROOT
    assert len(upgrade_runs(root)) == 5
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert upgrade_runs(root) == {}
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files


def test_a_student_whose_teacher_is_gone_is_left_as_it_was(old_runs):
    student = old_runs / "runs" / OLD_ROOT / "students" / "kd-dense"
    stored = yaml.safe_load((student / "config.yaml").read_text())
    stored["config"]["distill"]["teacher"] = f"{old_runs / 'gone'}:0"
    before = yaml.safe_dump(stored, sort_keys=False)
    (student / "config.yaml").write_text(before)
    assert upgrade_runs(student) == {}
    assert (student / "config.yaml").read_text() == before
