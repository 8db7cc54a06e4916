"""`dsd2-engine study sdd`: the contingent factors of sparse double descent, one factor at a time or in full."""

from __future__ import annotations

import json

import pytest

from dsd2.cli import main
from dsd2.config import ConfigError, build_config
from dsd2.study_sdd import (
    SddSetting,
    base_setting,
    check_grid,
    default_grid,
    entropy_stop,
    setting_config,
    settings,
    varied_factors,
)

TINY = ["--hidden", "16,16", "--levels", "3", "--epochs", "2", "--dense-epochs", "3", "--seeds", "0,1", "--quiet"]


def test_one_factor_at_a_time_varies_each_factor_alone_around_the_base():
    base = SddSetting("none", 0.5, 256, 2)
    grid = {"perturb": ("none", "rewind", "lr-rewind"), "noise": (0.0, 0.5), "width": (64, 256), "depth": (1, 2, 3)}
    got = settings(grid, base, full=False)
    assert got[0] == base and len(got) == 1 + 2 + 1 + 1 + 2 == len(set(got))
    assert SddSetting("lr-rewind", 0.5, 256, 2) in got and SddSetting("none", 0.0, 256, 2) in got
    assert SddSetting("none", 0.5, 256, 3) in got and SddSetting("rewind", 0.0, 256, 2) not in got
    assert len(settings(grid, base, full=True)) == 3 * 2 * 2 * 3


def test_the_default_grid_is_built_around_the_base_model():
    mlp = build_config()
    assert base_setting(mlp) == SddSetting("none", 0.5, 256, 2)
    assert default_grid(mlp) == {"perturb": ("none", "rewind", "reinit", "lr-rewind"), "noise": (0.0, 0.1, 0.2, 0.5),
                                 "width": (64, 256, 512), "depth": (1, 2, 3)}
    vgg = build_config("cifar10-vgg")
    assert default_grid(vgg)["width"] == (4, 5, 6) and default_grid(vgg)["depth"] == (4, 5, 6)


def test_a_setting_becomes_a_teacher_only_config():
    base = build_config()
    lr = setting_config(base, SddSetting("lr-rewind", 0.1, 64, 3))
    assert (lr.prune.perturb, lr.prune.retrain) == ("none", "lr-rewind")
    assert lr.model.hidden == (64, 64, 64) and lr.data.noise == 0.1 and lr.distill.students == ()
    reinit = setting_config(base, SddSetting("reinit", 0.5, 256, 2))
    assert (reinit.prune.perturb, reinit.prune.retrain) == ("reinit", "restart")
    vgg = setting_config(build_config("cifar10-vgg"), SddSetting("rewind", 0.2, 4, 3))
    assert (vgg.model.width, vgg.model.depth, vgg.prune.perturb) == (4, 3, "rewind")


@pytest.mark.parametrize("grid, words", [
    ({"perturb": ("none", "shuffle")}, "perturbation 'shuffle' is not known"),
    ({"noise": ()}, "axis 'noise' is empty"),
    ({"noise": (0.2, 1.0)}, "must lie in [0, 1)"),
    ({"width": (0, 8)}, "must be positive"),
])
def test_bad_grids_are_one_sentence(grid, words):
    cfg = build_config()
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_grid({**default_grid(cfg), **grid}, cfg)


def test_a_model_without_width_refuses_a_width_axis():
    cfg = build_config("cifar10-resnet18")
    with pytest.raises(ConfigError, match="no width or depth"):
        check_grid({**default_grid(cfg), "width": (32, 64)}, cfg)


def test_entropy_turn_and_stop_on_a_hand_made_curve():
    cfg = build_config()  # tolerance 0.05, patience 3
    h = [0.90, 0.91, 0.91, 0.80, 0.70, 0.60, 0.50, 0.40]
    val = [0.50, 0.52, 0.55, 0.60, 0.58, 0.57, 0.56, 0.50]
    rows = [{"level": i, "entropy_mean": e, "val_acc": v, "test_acc": v, "sparsity": i / 10}
            for i, (e, v) in enumerate(zip(h, val))]
    # the entropy falls at level 3; validation peaks at 3 and then fails to improve for 3 levels: stop at 6
    assert entropy_stop(rows, cfg) == {"turn": 3, "stop": 6, "returned": 3}
    flat = [dict(r, entropy_mean=0.9) for r in rows]
    assert entropy_stop(flat, cfg) == {"turn": None, "stop": None, "returned": 3}


@pytest.mark.slow
def test_a_tiny_study_runs_resumes_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "study"
    axes = ["--perturbations", "none,reinit", "--noises", "0.2,0.5", "--widths", "16", "--depths", "1,2"]
    assert main(["study", "sdd", *TINY, *axes, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "study_summary.json").read_text())
    names = [r["setting"] for r in summary["settings"]]
    assert names == ["none-n0.5-w16-d2", "reinit-n0.5-w16-d2", "none-n0.2-w16-d2", "none-n0.5-w16-d1"]
    assert "4 settings x 2 seeds" in text and (out / "study_heatmap.png").is_file()
    assert len(list((out / "runs").iterdir())) == 8
    for row in summary["settings"]:
        assert row["verdict"] in ("SDD present", "dodged", "inconclusive") and row["seeds"] == 2
        assert row["dip_lower"] <= row["dip"] <= row["dip_upper"]
    table = (out / "study.md").read_text()
    assert all(name in table for name in names)
    # a killed study: one run lost its summary; the same command reruns that one only
    victim = sorted((out / "runs").iterdir())[0]
    (victim / "summary.json").unlink()
    assert main(["study", "sdd", *TINY, *axes, "--out", str(out)]) == 0
    assert "8 runs, 7 finished, 1 to run" in capsys.readouterr().out
    assert json.loads((out / "study_summary.json").read_text())["settings"] == summary["settings"]


def test_an_unknown_factor_and_a_kd_axis_are_refused_in_one_line(tmp_path, capsys):
    for args, words in ((["--perturbations", "shuffle"], "perturbation 'shuffle' is not known"),
                        (["--alphas", "0.5"], "--alphas is an axis of study kd")):
        assert main(["study", "sdd", *TINY, *args, "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert main(["study", "kd", *TINY, "--noises", "0.1", "--out", str(tmp_path / "k")]) == 2
    assert "--noises belongs to study sdd" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "k").exists()


def test_a_model_of_fixed_size_varies_perturbation_and_noise_only():
    cfg = build_config("fmnist-lenet5")
    base = base_setting(cfg)
    assert base == SddSetting("none", 0.2, None, None) and base.name == "none-n0.2"
    grid = default_grid(cfg)
    assert grid["width"] == (None,) and grid["depth"] == (None,)
    check_grid(grid, cfg)
    chosen = settings(grid, base, full=False)
    assert [s.name for s in chosen] == ["none-n0.2", "rewind-n0.2", "reinit-n0.2", "lr-rewind-n0.2", "none-n0",
                                        "none-n0.1", "none-n0.5"]
    assert len(settings(grid, base, full=True)) == 4 * 4
    rows = [{"setting": s.name, **s.__dict__} for s in chosen]
    assert varied_factors(rows, base) == ["perturb", "noise"]  # the heatmap's rows: no width or depth row
    assert varied_factors(rows[:1], base) == ["perturb"]
    assert setting_config(cfg, chosen[1]).model.name == "lenet5"


def test_a_fixed_size_study_from_the_last_release_is_upgraded_to_resume(tmp_path):
    from dsd2.study_sdd import upgrade_fixed_size_grid

    cfg = build_config("fmnist-lenet5")
    old = {"study": "sdd", "grid": {"perturb": ["none"], "noise": [0.2], "width": [5], "depth": [5]}, "seeds": [0]}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(old))
    upgrade_fixed_size_grid(path, cfg)
    assert json.loads(path.read_text()) == {**old, "grid": {**old["grid"], "width": [None], "depth": [None]}}
    mlp = {**old, "grid": {**old["grid"], "width": [256], "depth": [2]}}
    path.write_text(json.dumps(mlp))
    upgrade_fixed_size_grid(path, build_config())  # an MLP's axes are its own: left as they are
    assert json.loads(path.read_text()) == mlp
