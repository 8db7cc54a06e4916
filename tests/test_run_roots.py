"""Every command takes the main job's experiment root (runs/<name>-<hash>, holding teacher/ and
students/<kind>/): entropy measures every run in it, distill takes its teacher, report reports the experiment,
train --resume continues it. A path holding several candidates where one is needed, or none, is one line
listing them, exit 2."""

import csv
import re

import pytest

from dsd2.cli import main
from dsd2.runs import RunDir, RunError, read_jsonl, resolve_run, resolve_runs

TINY = ["--epochs", "1", "--dense-epochs", "1", "--levels", "2", "--quiet"]
KINDS = ("vanilla", "kd-dense", "kd-sparse")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One tiny main job (teacher and three students), shared by every test of this module."""
    path = tmp_path_factory.mktemp("exp") / "digits-mlp-tiny"
    assert main(["train", *TINY, "--out", str(path)]) == 0
    return path


def run_main(args, capsys):
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parts(root):
    return [root / "teacher", *(root / "students" / k for k in KINDS)]


@pytest.mark.slow
def test_resolution_rules(root):
    assert [r.root for r in resolve_runs(root)] == parts(root)
    assert resolve_run(root, "teacher").root == root / "teacher"
    assert resolve_run(root, "experiment").root == root
    assert [r.root for r in resolve_runs(root / "teacher")] == [root / "teacher"]
    assert [r.root for r in resolve_runs(root / "students")] == [root / "students" / k for k in sorted(KINDS)]
    assert [r.root for r in resolve_runs(root.parent, "experiment")] == [root]  # a folder of runs
    with pytest.raises(ValueError, match="role 'student' is not known"):
        resolve_runs(root, "student")


def test_a_level_loop_run_whose_config_names_students_is_a_run(tmp_path):
    """The Python API may run the level loop on a config that names students: without a teacher/ folder beside
    its config.yaml it is a run, not an experiment root."""
    run = RunDir(tmp_path / "run")
    run.claim({"distill": {"students": ["vanilla", "kd-sparse"]}}, "h")
    for role in ("levels", "teacher", "experiment"):
        assert [r.root for r in resolve_runs(run.root, role)] == [run.root]
    assert not run.is_experiment()


@pytest.mark.slow
def test_entropy_of_a_root_measures_the_teacher_and_every_student(root, capsys):
    code, out, _ = run_main(["entropy", str(root)], capsys)
    assert code == 0 and out.count("written:") == 4
    for run in parts(root):
        rows = read_jsonl(run / "entropy.jsonl")
        assert [r["level"] for r in rows] == [0, 1, 2] and all(0 <= r["entropy_mean"] <= 1 for r in rows)
    code, out, _ = run_main(["entropy", str(root / "students" / "kd-sparse")], capsys)  # one run, by its folder
    assert code == 0 and out.count("written:") == 1


@pytest.mark.slow
def test_distill_from_a_root_takes_its_teacher(root, tmp_path, capsys):
    out = tmp_path / "student"
    code, printed, err = run_main(["distill", "--teacher", f"{root}:dense", *TINY,
                                   "--out", str(out)], capsys)
    assert code == 0, err
    assert f"teacher: {root / 'teacher'} level 0" in printed
    stored = RunDir(out).stored_config()["config"]["distill"]
    assert stored["teacher"] == f"{(root / 'teacher').resolve()}:0"
    assert len(RunDir(out).levels()) == 3


@pytest.mark.slow
def test_report_of_a_root_is_the_experiment_report_with_readable_costs(root, tmp_path, capsys):
    out = tmp_path / "rep"
    code, printed, err = run_main(["report", str(root), "--out", str(out)], capsys)
    assert code == 0, err
    assert {"fig2_teacher.png", "fig5_students.png", "table1.md", "curve_kd-sparse.csv"} <= {
        p.name for p in out.iterdir()}
    md = (out / "table1.md").read_text()
    assert re.search(r"\| \d+(\.\d+)? [kMGTPE]?FLOPs \|", md) and not re.search(r"\d[eE]-?\d", md)
    table = list(csv.DictReader(open(out / "table1.csv")))
    teacher = next(t for t in table if t["configuration"] == "teacher" and t["loop"] == "full loop")
    exact = sum(r["train_flops_dense"] for r in read_jsonl(root / "teacher" / "metrics.jsonl")) / 1e15
    assert float(teacher["train PFLOPs (dense, 1/MAC)"]) == pytest.approx(exact, rel=1e-12)
    code, _, err = run_main(["report", str(root / "students"), "--out", str(tmp_path / "students")], capsys)
    assert code == 0, err
    assert (tmp_path / "students" / "compare.png").exists()  # the three students on one panel


@pytest.mark.slow
def test_resume_a_root_continues_the_experiment(root, capsys):
    (root / "summary.json").unlink()
    (root / "students" / "kd-sparse" / "summary.json").unlink()
    code, printed, err = run_main(["train", "--resume", str(root), "--quiet"], capsys)
    assert code == 0, err
    assert "student kd-sparse:" in printed and "training " in printed and "FLOPs" in printed
    assert RunDir(root).summary()["finished"] and RunDir(root / "students" / "kd-sparse").summary()["finished"]
    code, printed, _ = run_main(["train", "--resume", str(root), "--quiet"], capsys)
    assert code == 0 and "already complete" in printed


@pytest.mark.slow
def test_a_folder_of_several_runs_where_one_is_needed_lists_them(root, tmp_path, capsys):
    both = tmp_path / "both"
    both.mkdir()
    (both / "a").symlink_to(root, target_is_directory=True)
    (both / "b").symlink_to(root, target_is_directory=True)
    out = tmp_path / "out"
    for args, candidates in [
        (["distill", "--teacher", str(root / "students"), *TINY, "--out", str(out)],
         [root / "students" / k for k in sorted(KINDS)]),
        (["distill", "--teacher", str(both), *TINY, "--out", str(out)],
         [both / "a" / "teacher", both / "b" / "teacher"]),
        (["train", "--resume", str(both), "--quiet"], [both / "a", both / "b"]),
        (["train", "--resume", str(root / "students"), "--quiet"], [root / "students" / k for k in sorted(KINDS)]),
    ]:
        code, _, err = run_main(args, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"holds {len(candidates)} runs, so name one of them: {', '.join(map(str, candidates))}" in err
    assert not out.exists()


def test_an_empty_folder_is_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for args in (["entropy", str(empty)], ["report", str(empty)], ["train", "--resume", str(empty)],
                 ["distill", "--teacher", str(empty), *TINY, "--out", str(out)]):
        code, _, err = run_main(args, capsys)
        assert code == 2 and err.count("\n") == 1 and f"'{empty}' holds no dsd2 run yet" in err, err
    assert list(empty.iterdir()) == [] and not out.exists()
    code, _, err = run_main(["entropy", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err
    with pytest.raises(RunError, match="does not exist"):
        resolve_run(tmp_path / "nowhere", "teacher")
