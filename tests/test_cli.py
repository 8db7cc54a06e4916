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
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args, words", [
    (["--noise", "1.2"], "noise 1.2 is outside [0, 1)"),
    (["--noise", "-0.5"], "outside [0, 1)"),
    (["--levels", "200"], "200 levels cannot be reached"),
    (["--dataset", "cifar10"], "needs --data-root"),
    (["--prune-fraction", "0"], "prune fraction"),
    (["--cuda-graphs", "--device", "cpu"], "CUDA graphs need a CUDA device"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--out", str(out), *args], capsys)
    assert code == 2
    assert words in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_data_root_names_the_path(tmp_path, capsys):
    code, err = run_main(["train", *TINY, "--dataset", "cifar10", "--model", "vgg",
                          "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and str(tmp_path / "nope") in err and "--download" in err


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


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--levels", "2", "--out", str(out)]) == 0
    (out / "summary.json").unlink()
    last = out / "checkpoints" / "last.safetensors"
    last.write_bytes(b"\x00garbage" * 10)
    code, err = run_main(["train", *TINY, "--levels", "2", "--out", str(out)], capsys)
    assert code == 2 and "corrupt" in err and str(last) in err
    assert last.read_bytes() == b"\x00garbage" * 10


def test_rerun_of_finished_run_reports_and_resume_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "already complete" in printed and str(out) in printed
    assert RunDir(out).summary()["finished"]


def test_info_lists_backends(tmp_path):
    out = subprocess.run([*ENGINE, "info"], capture_output=True, text=True, env=engine_env(), check=True,
                         cwd=tmp_path)
    for words in ("torch", "backend cpp_extension: loaded", "backend triton", "backend cuda", "device:",
                  "cuda graphs:"):
        assert words in out.stdout


def test_default_run_dir_is_named_by_hash(tmp_path):
    proc = subprocess.run([*ENGINE, "train", *TINY], cwd=tmp_path, capture_output=True, text=True,
                          env=engine_env(), check=True)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits-mlp-")
    assert f"results: runs/{runs[0].name}" in proc.stdout


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
