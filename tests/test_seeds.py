"""Seeds as an axis (`train --seeds`), the per-image test outcomes behind the verdicts, and `study kd`."""

import json

import pytest
import torch

from dsd2.analysis.stats import mean_ci, unpack_outcomes
from dsd2.cli import main
from dsd2.runs import RunDir, resolve_runs

TINY = ["--epochs", "1", "--dense-epochs", "1", "--levels", "2", "--quiet"]


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def seeds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds") / "exp"
    assert main(["train", *TINY, "--students", "vanilla", "--seeds", "0,1", "--early-stop", "val", "--patience", "2",
                 "--out", str(root)]) == 0
    return root


@pytest.mark.slow
def test_each_seed_is_its_own_experiment(seeds_root):
    for seed in (0, 1):
        sub = RunDir(seeds_root / f"seed-{seed}")
        assert sub.is_experiment() and sub.stored_config()["config"]["seed"] == seed
        assert sub.stored_config()["config"]["seeds"] == []
    assert RunDir(seeds_root).stored_config()["config"]["seeds"] == [0, 1]


@pytest.mark.slow
def test_the_summary_aggregates_every_curve_point(seeds_root):
    summary = RunDir(seeds_root).summary()
    assert summary["experiment"] == "seeds" and summary["seeds"] == [0, 1]
    assert set(summary["curves"]) == {"teacher", "vanilla"}
    rows = [RunDir(seeds_root / f"seed-{s}" / "students" / "vanilla").levels() for s in (0, 1)]
    curve = summary["curves"]["vanilla"]
    for level, point in enumerate(curve["points"]):
        expected = mean_ci([r[level]["test_acc"] for r in rows], (0.0, 1.0))
        assert point["test_acc"]["mean"] == pytest.approx(expected["mean"])
        assert point["test_acc"]["ci95"] == pytest.approx(expected["ci95"])
        assert point["dist_from_init"]["n"] == 2
    best = [max(r, key=lambda x: (x["val_acc"], x["sparsity"]))["test_acc"] for r in rows]
    assert curve["headline"]["best_test_acc"]["mean"] == pytest.approx(sum(best) / 2)
    assert curve["verdict"]["verdict"] in ("SDD present", "dodged", "inconclusive")
    stops = [RunDir(seeds_root / f"seed-{s}" / "students" / "vanilla").summary()["early_stop"] for s in (0, 1)]
    assert curve["headline"]["early_stop_returned_test_acc"]["mean"] == pytest.approx(
        sum(s["returned_test_acc"] for s in stops) / 2)
    assert curve["verdict"]["seeds"] == 2 and curve["verdict"]["samples"] == rows[0][0]["test_images"]


@pytest.mark.slow
def test_outcomes_are_the_test_accuracy(seeds_root):
    for row in RunDir(seeds_root / "seed-0" / "teacher").levels():
        correct = unpack_outcomes(row["test_outcomes"], row["test_images"])
        assert correct.float().mean().item() == pytest.approx(row["test_acc"], abs=1e-6)


@pytest.mark.slow
def test_a_finished_seed_is_not_run_again(seeds_root, capsys):
    seed0 = seeds_root / "seed-0" / "teacher" / "metrics.jsonl"
    before = seed0.stat().st_mtime_ns
    (seeds_root / "summary.json").unlink()
    (seeds_root / "seed-1" / "summary.json").unlink()
    code, out = run_main(["train", *TINY, "--students", "vanilla", "--seeds", "0,1", "--early-stop", "val",
                          "--patience", "2", "--out", str(seeds_root)], capsys)
    assert code == 0 and seed0.stat().st_mtime_ns == before
    assert "== seed 1 " in out.out and "seed 0" not in out.out
    assert "| vanilla | 2 |" in out.out
    code, out = run_main(["train", "--resume", str(seeds_root)], capsys)
    assert code == 0 and "already complete" in out.out


@pytest.mark.slow
def test_report_and_run_roles_of_a_seeds_root(seeds_root, capsys, tmp_path):
    assert [r.root for r in resolve_runs(seeds_root, "experiment")] == [seeds_root]
    levels = resolve_runs(seeds_root, "levels")
    assert [r.root.relative_to(seeds_root).as_posix() for r in levels] == [
        "seed-0/teacher", "seed-0/students/vanilla", "seed-1/teacher", "seed-1/students/vanilla"]
    code, _ = run_main(["report", str(seeds_root), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0
    verdicts = (tmp_path / "rep" / "verdicts.md").read_text()
    assert "| teacher | 2 |" in verdicts and "| vanilla | 2 |" in verdicts
    data = json.loads((tmp_path / "rep" / "figure_data.json").read_text())
    group = data["fig2_teacher"]["groups"][0]
    assert len(group["runs"]) == 2 and all(h >= 0 for h in group["test_ci95_half_pct"])


@pytest.mark.slow
def test_one_seed_experiment_prints_each_students_verdict(tmp_path, capsys):
    out = tmp_path / "one"
    code, printed = run_main(["train", *TINY, "--students", "vanilla", "--out", str(out)], capsys)
    assert code == 0 and "student vanilla:" in printed.out
    verdict = RunDir(out).summary()["students"]["vanilla"]["verdict"]
    assert verdict["describe"] in printed.out and "one seed" in verdict["note"]
    # a summary written before verdicts existed still prints
    summary = json.loads((out / "summary.json").read_text())
    del summary["students"]["vanilla"]["verdict"]
    (out / "summary.json").write_text(json.dumps(summary))
    code, printed = run_main(["train", *TINY, "--students", "vanilla", "--out", str(out)], capsys)
    assert code == 0 and "no verdict (a run made before verdicts were recorded)" in printed.out


@pytest.mark.parametrize("args, words", [
    (["--seeds", "1,1"], "seeds 1,1 must be distinct numbers >= 0"),
    (["--seeds", "0,x"], "'0,x' is not a comma-separated list of whole numbers"),
    (["--dodge-margin", "2"], "dodge margin 2.0 is outside (0, 1)"),
])
def test_bad_seed_flags_are_one_sentence(args, words, tmp_path, capsys):
    code, out = run_main(["train", *TINY, *args, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and words in out.err and len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_api_refuses_seeds(tmp_path):
    import dsd2
    from dsd2.config import ConfigError

    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 2
    with pytest.raises(ConfigError, match="call dsd2.prune once per seed"):
        dsd2.prune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)), (x, y), (x, y),
                   out=tmp_path / "api", config={"seeds": [0, 1]})


def test_seeds_from_a_preset_or_a_config_file(tmp_path):
    from dsd2.config import build_config

    flags = build_config(None, None, {"seeds": (0, 1, 2)})
    assert build_config("digits-mlp-3seeds").run_hash() == flags.run_hash()
    (tmp_path / "c.yaml").write_text("seeds: [0, 1, 2]\n")
    assert build_config(None, str(tmp_path / "c.yaml")).seeds == (0, 1, 2)


def test_the_dodge_margin_does_not_rename_a_run():
    from dsd2.config import build_config

    base = build_config(None, None, {})
    assert build_config(None, None, {"analysis": {"dodge_margin": 0.02}}).run_hash() == base.run_hash()
    assert build_config(None, None, {"seeds": (0, 1)}).run_hash() != base.run_hash()


# ---- study kd ------------------------------------------------------------------------------------------------------

STUDY = ["study", "kd", "--epochs", "1", "--dense-epochs", "1", "--levels", "2", "--quiet", "--seeds", "0,1",
         "--widths", "16", "--temperatures", "4", "--alphas", "0.5,1"]


@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "kd"
    assert main([*STUDY, "--out", str(root)]) == 0
    return root


@pytest.mark.slow
def test_the_study_runs_every_setting_on_every_seed(study_root):
    summary = json.loads((study_root / "study_summary.json").read_text())
    names = [r["setting"] for r in summary["settings"]]
    assert names == ["vanilla-w16", "dense-w16-a0.5-t4", "dense-w16-a1-t4", "best-w16-a0.5-t4", "best-w16-a1-t4"]
    for name in names:
        for seed in (0, 1):
            cfg = RunDir(study_root / "runs" / name / f"seed-{seed}").stored_config()["config"]
            assert cfg["seed"] == seed and cfg["model"]["hidden"] == [16, 16]
            if name != "vanilla-w16":
                assert cfg["distill"]["alpha"] == float(name.split("-a")[1].split("-")[0])
                teacher_level = int(cfg["distill"]["teacher_id"].rsplit(":", 1)[1])
                assert (teacher_level == 0) == name.startswith("dense")
            else:
                assert cfg["distill"]["teacher"] is None
    row = summary["settings"][1]
    assert row["seeds"] == 2 and row["verdict"] in ("SDD present", "dodged", "inconclusive")
    assert row["teacher_pflops"] > 0 and row["dist_init_sweet"] is not None
    table = (study_root / "study.md").read_text()
    assert all(f"| {n} | 2 |" in table for n in names)
    assert (study_root / "study_heatmap.png").stat().st_size > 0


@pytest.mark.slow
def test_the_study_resumes_and_refuses_another_grid(study_root, capsys):
    metrics = study_root / "runs" / "best-w16-a1-t4" / "seed-1" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    code, out = run_main([*STUDY, "--out", str(study_root)], capsys)
    assert code == 0 and metrics.stat().st_mtime_ns == before and "== best" not in out.out
    code, out = run_main([*STUDY[:-1], "0.8", "--out", str(study_root)], capsys)
    assert code == 2 and "holds another study" in out.err and len(out.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--alphas", "1.5"], "study alphas [1.5] must lie in [0, 1]"),
    (["--teachers", "dense,worst"], "study teacher 'worst' is not known; allowed: none, dense, best"),
    (["--widths", "0"], "study widths [0] must be positive"),
    (["--temperatures", "0"], "study temperatures [0.0] must be > 0"),
])
def test_bad_study_grids_are_one_sentence(args, words, tmp_path, capsys):
    code, out = run_main([*STUDY, *args, "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and words in out.err and len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
