"""`dsd2-engine` as a user meets it: bad input is one line and exit code 2, and touches nothing."""

import subprocess

import pytest
from conftest import ENGINE, engine_env

from dsd2.cli import main
from dsd2.runs import RunDir

TINY = ["--epochs", "1", "--dense-epochs", "1", "--levels", "1", "--quiet", "--students", "none"]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # a usage error, found by argparse
        code = exc.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args, words", [
    (["--noise", "1.2"], "noise 1.2 is outside [0, 1)"),
    (["--noise", "-0.5"], "outside [0, 1)"),
    (["--levels", "200"], "200 levels cannot be reached"),
    (["--dataset", "cifar10"], "needs --data-root"),
    (["--prune-fraction", "0"], "prune fraction"),
    (["--cuda-graphs", "--device", "cpu"], "CUDA graphs need a CUDA device"),
    (["--criterion", "bogus"], "argument --criterion: invalid choice: 'bogus' (choose from"),
    (["--entropy-granularity", "pixel"], "invalid choice: 'pixel'"),
    (["--hidden", "64,x"], "argument --hidden: '64,x' is not a comma-separated list of whole numbers"),
    (["--milestones", "a"], "'a' is not a comma-separated list of numbers"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--students", "vanilla,bogus"], "student 'bogus' is not known; allowed: vanilla, kd-dense, kd-sparse"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--out", str(out), *args], capsys)
    assert code == 2
    assert words in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"\xff\xfe\x00garbage\x89PNG",
                                     b"\x00\x01\x02\x03 valid UTF-8, not YAML"])
def test_binary_config_file_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, content):
    monkeypatch.chdir(tmp_path)  # the default run folder would be runs/ here
    config = tmp_path / "garbage.yaml"
    config.write_bytes(content)
    code, err = run_main(["train", *TINY, "--config", str(config)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"config file '{config}' is not" in err, err
    assert "Traceback" not in err and [p.name for p in tmp_path.iterdir()] == ["garbage.yaml"]


def test_missing_data_root_names_the_path(tmp_path, capsys):
    code, err = run_main(["train", *TINY, "--dataset", "cifar10", "--model", "vgg",
                          "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and str(tmp_path / "nope") in err and "--download" in err


@pytest.mark.slow
def test_folder_with_a_different_run_is_left_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    before = snapshot(out)
    code, err = run_main(["train", *TINY, "--seed", "9", "--out", str(out)], capsys)
    assert code == 2 and "holds a different run" in err
    assert snapshot(out) == before


def test_foreign_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    code, err = run_main(["train", *TINY, "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err
    assert (out / "notes.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--levels", "2", "--out", str(out)]) == 0
    (out / "summary.json").unlink()
    last = out / "checkpoints" / "last.safetensors"
    last.write_bytes(b"\x00garbage" * 10)
    code, err = run_main(["train", *TINY, "--levels", "2", "--out", str(out)], capsys)
    assert code == 2 and "corrupt" in err and str(last) in err
    assert last.read_bytes() == b"\x00garbage" * 10


@pytest.mark.slow
def test_rerun_of_finished_run_reports_and_resume_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "already complete" in printed and str(out) in printed
    assert RunDir(out).summary()["finished"]


@pytest.mark.slow
def test_info_lists_backends(tmp_path):
    out = subprocess.run([*ENGINE, "info"], capture_output=True, text=True, env=engine_env(), check=True,
                         cwd=tmp_path)
    for words in ("torch", "backend cpp_extension: loaded", "backend triton", "backend cuda", "device:",
                  "cuda graphs:"):
        assert words in out.stdout


@pytest.mark.slow
def test_default_run_dir_is_named_by_hash(tmp_path):
    proc = subprocess.run([*ENGINE, "train", *TINY], cwd=tmp_path, capture_output=True, text=True,
                          env=engine_env(), check=True)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits-mlp-")
    assert f"results: runs/{runs[0].name}" in proc.stdout


@pytest.mark.slow
def test_foreign_checkpoint_is_refused(tmp_path, capsys):
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert main(["train", *TINY, "--levels", "2", "--out", str(mine)]) == 0
    assert main(["train", *TINY, "--levels", "2", "--seed", "5", "--out", str(other)]) == 0
    (mine / "summary.json").unlink()
    last = mine / "checkpoints" / "last.safetensors"
    last.write_bytes((other / "checkpoints" / "last.safetensors").read_bytes())
    capsys.readouterr()
    code, err = run_main(["train", *TINY, "--levels", "2", "--out", str(mine)], capsys)
    assert code == 2 and "belongs to run" in err and str(last) in err


@pytest.mark.slow
def test_metrics_mark_the_best_level(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--levels", "2", "--out", str(out)]) == 0
    rows = RunDir(out).levels()
    assert sum(r["best"] for r in rows) == 1
    assert next(r for r in rows if r["best"])["level"] == RunDir(out).summary()["best_level"]


def test_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "foo"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'foo'" in err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    code, err = run_main(["train", *TINY, "--out", str(target)], capsys)
    assert code == 2 and "is a file, not a folder" in err and target.read_text() == "keep me"


# ---- flags generated from the config fields ---------------------------------------------------------------------


def train_parser():
    import argparse

    from dsd2.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def flag_actions():
    return {s: a for a in train_parser()._actions for s in a.option_strings}


def test_every_config_field_has_a_flag_with_help():
    from dsd2.cli import FLAG_MAP
    from dsd2.config import config_options

    actions = flag_actions()
    internal = {o.path for o in config_options() if o.flag is None}
    # set by distill, the experiment, and the Python API (its fingerprints of a given model and data)
    assert internal == {"distill.teacher", "distill.teacher_id", "model.module", "data.fingerprint"}
    for opt in config_options():
        if opt.flag is None:
            continue
        action = actions[f"--{opt.flag}"]
        assert action.help and action.help.strip(), opt.path
        assert FLAG_MAP[opt.dest] == (opt.section, opt.name)
        if opt.kind == "bool":
            assert f"--no-{opt.flag}" in actions, opt.path
        if opt.choices is not None and not opt.is_list:
            assert tuple(action.choices) == opt.choices


def test_readme_flag_table_names_real_flags():
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    table = text[text.index("| flag | meaning |"):]
    table = table[:table.index("\n\n")]
    named = {flag for row in table.splitlines()[2:] for flag in re.findall(r"--[a-z][a-z-]*", row.split(" | ")[0])}
    assert len(named) > 40
    assert named <= set(flag_actions())


def sample_value(opt):
    """A value of the field's type that differs from its default, and how it is written as a flag."""
    if opt.kind == "bool":
        return True, [f"--{opt.flag}"]
    if opt.choices is not None:
        value = opt.choices[-1]
        return ((value,), [f"--{opt.flag}", value]) if opt.is_list else (value, [f"--{opt.flag}", value])
    sample = {"int": 7, "float": 0.25, "str": "text"}[opt.kind]
    if opt.is_list:
        return (sample, sample), [f"--{opt.flag}", f"{sample},{sample}"]
    return sample, [f"--{opt.flag}", str(sample)]


def test_every_flag_lands_in_its_config_field():
    from dsd2.cli import build_parser, overrides_from_args
    from dsd2.config import config_options

    parser = build_parser()
    for opt in config_options():
        if opt.flag is None:
            continue
        value, argv = sample_value(opt)
        overrides = overrides_from_args(parser.parse_args(["train", *argv]))
        placed = overrides if opt.section is None else overrides[opt.section]
        assert placed == {opt.name: value}, opt.path
    assert overrides_from_args(parser.parse_args(["train"])) == {}


@pytest.mark.parametrize("argv, path, value", [
    (["--epochs", "7"], "optim.epochs", 7),  # int
    (["--noise", "0.25"], "data.noise", 0.25),  # float
    (["--lr-decay", "0.5"], "optim.gamma", 0.5),  # flag named otherwise than its field
    (["--augment"], "data.augment", True),  # bool pair
    (["--no-augment"], "data.augment", False),
    (["--no-channels-last"], "channels_last", False),
    (["--cuda-graphs"], "cuda_graphs", True),
    (["--no-cuda-graphs"], "cuda_graphs", False),
    (["--download"], "data.download", True),
    (["--hidden", "64,32"], "model.hidden", (64, 32)),  # tuple list
    (["--student-hidden", "16"], "distill.student_hidden", (16,)),
    (["--milestones", "0.3,0.6"], "optim.milestones", (0.3, 0.6)),
    (["--students", "vanilla,kd-dense"], "distill.students", ("vanilla", "kd-dense")),
    (["--students", "none"], "distill.students", ()),
    (["--dense-epochs", "9"], "optim.dense_epochs", 9),  # optional
    (["--target-sparsity", "0.9"], "prune.target_sparsity", 0.9),
    (["--model", "lenet300"], "model.name", "lenet300"),  # choice
    (["--entropy-granularity", "channel"], "analysis.granularity", "channel"),
    (["--teacher-level", "dense"], "distill.teacher_level", "dense"),  # str
    (["--seed", "3"], "seed", 3),  # top level
])
def test_flag_round_trips_into_the_config(argv, path, value):
    from dsd2.cli import build_parser, overrides_from_args
    from dsd2.config import build_config

    args = build_parser().parse_args(["train", *argv])
    node = build_config(args.preset, args.config, overrides_from_args(args))
    for part in path.split("."):
        node = getattr(node, part)
    assert node == value


def test_preset_then_file_then_flags(tmp_path):
    from dsd2.cli import build_parser, overrides_from_args
    from dsd2.config import build_config

    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  epochs: 7\n  lr: 0.01\ndata:\n  augment: false\n")
    parser = build_parser()

    def config(*argv):
        args = parser.parse_args(["train", "--preset", "cifar10-vgg", "--config", str(f), *argv])
        return build_config(args.preset, args.config, overrides_from_args(args))

    cfg = config("--lr", "0.5")
    assert (cfg.optim.optimizer, cfg.optim.epochs, cfg.optim.lr) == ("sgd", 7, 0.5)  # preset, file, flag
    assert cfg.data.augment is False  # the file's false is not overridden by an absent flag
    assert config("--augment").data.augment is True


def test_sweep_grid_takes_the_flag_names():
    from dsd2.sweep import ALIASES, parse_grid

    old = {"noise": "data.noise", "noise_type": "data.noise_type", "seed": "seed", "depth": "model.depth",
           "delta": "model.depth", "width": "model.width", "gamma": "model.width", "model": "model.name",
           "dataset": "data.dataset", "levels": "prune.levels", "epochs": "optim.epochs", "lr": "optim.lr",
           "alpha": "distill.alpha", "temperature": "distill.temperature", "perturb": "prune.perturb"}
    assert old.items() <= ALIASES.items()
    grid = parse_grid(["noise-type=pairflip", "lr_decay=0.5", "entropy-granularity=channel", "optim.momentum=0"])
    assert grid == {"data.noise_type": ["pairflip"], "optim.gamma": [0.5], "analysis.granularity": ["channel"],
                    "optim.momentum": [0]}
