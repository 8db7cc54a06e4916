"""The DSD² experiment: teacher curve, teacher selection, distilled students; the distill command."""

import json
import signal
import subprocess
import time
from dataclasses import replace

import pytest
import torch
from conftest import ENGINE, engine_env

from dsd2.cli import main
from dsd2.ops import kd_loss
from dsd2.run import LevelLoop, load_teacher, run_experiment, student_config
from dsd2.runs import RunDir, load_checkpoint, read_jsonl
from dsd2.training import DistillationObjective

VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "achieved_flop_per_s"}
TINY = ["--epochs", "2", "--dense-epochs", "3", "--levels", "3", "--quiet"]


def stable(rows, drop=()):
    return [{k: v for k, v in r.items() if k not in VOLATILE and k not in drop} for r in rows]


def quiet(cfg, path):
    return LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None)


@pytest.fixture
def teacher_run(tmp_path, tiny_config):
    path = tmp_path / "teacher"
    quiet(tiny_config(distill__students=()), path).run()
    return path


@pytest.mark.slow
def test_alpha_zero_reproduces_the_vanilla_student_exactly(tmp_path, tiny_config, teacher_run):
    cfg = tiny_config()
    vanilla = student_config(cfg, "vanilla", teacher_run, "h", 2)
    kd0 = student_config(replace(cfg, distill=replace(cfg.distill, alpha=0.0)), "kd-sparse", teacher_run, "h", 2)
    quiet(vanilla, tmp_path / "vanilla").run()
    quiet(kd0, tmp_path / "kd0").run()
    a = stable(read_jsonl(tmp_path / "vanilla" / "metrics.jsonl"), drop={"teacher_flops", "kd_ce", "kd_kl"})
    b = stable(read_jsonl(tmp_path / "kd0" / "metrics.jsonl"), drop={"teacher_flops", "kd_ce", "kd_kl"})
    assert a == b


def test_distillation_objective_is_the_kd_formula():
    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    s = torch.randn(5, 3)
    obj = DistillationObjective(teacher, alpha=0.7, temperature=3.0)
    got = obj(s, y, x, torch.arange(5))
    t = teacher(x).detach()
    p = torch.softmax(t / 3, 1)
    kl = (p * (p.log() - torch.log_softmax(s / 3, 1))).sum(1).mean()
    want = 0.3 * torch.nn.functional.cross_entropy(s, y) + 0.7 * 9 * kl
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert obj.parts()["kd_kl"] == pytest.approx(float(kl), rel=1e-5)
    cached = DistillationObjective(teacher, 0.7, 3.0, cached_logits=t)
    assert float(cached(s, y, x, torch.arange(5))) == pytest.approx(float(got), rel=1e-6)
    assert float(kd_loss(s, t, y, alpha=0.7, temperature=3.0)) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow
def test_experiment_selects_the_teacher_and_students_load_it(tmp_path, tiny_config):
    cfg = tiny_config()
    root = RunDir(tmp_path / "exp")
    summary = run_experiment(cfg, root, progress=False, log=lambda s: None)
    teacher_rows = read_jsonl(root.root / "teacher" / "metrics.jsonl")
    best = max(teacher_rows, key=lambda r: (r["val_acc"], r["sparsity"]))["level"]
    assert summary["teacher"]["selected_level"] == best
    assert set(summary["students"]) == {"vanilla", "kd-dense", "kd-sparse"}
    sparse = json.loads((root.root / "students" / "kd-sparse" / "summary.json").read_text())
    dense = json.loads((root.root / "students" / "kd-dense" / "summary.json").read_text())
    assert sparse["teacher"]["level"] == best and dense["teacher"]["level"] == 0
    # the weights the student used are exactly the selected checkpoint's
    teacher, info = load_teacher(f"{root.root / 'teacher'}:{best}", (1, 8, 8), 10, torch.device("cpu"))
    saved, _ = load_checkpoint(root.root / "teacher" / "checkpoints" / f"level_{best:02d}.safetensors")
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, saved[f"model.{k}"])
    rows = read_jsonl(root.root / "students" / "kd-sparse" / "metrics.jsonl")
    assert all("kd_ce" in r and "kd_kl" in r for r in rows)
    assert rows[0]["teacher_flops"] > 0 and rows[1]["teacher_flops"] == 0  # logits cached: one teacher pass
    for st in summary["students"].values():
        assert isinstance(st["critical_dip"], bool) and "phases" in st
    # the student model is the configured one, smaller than the teacher
    assert json.loads((root.root / "students" / "vanilla" / "summary.json").read_text())["relu_layers"]


@pytest.mark.slow
def test_teacher_weights_are_checked(tmp_path, tiny_config, teacher_run):
    cfg = student_config(tiny_config(), "kd-sparse", teacher_run, "h", 1)
    engine = quiet(cfg, tmp_path / "s")
    engine.prepare()
    engine.teacher.check_unchanged()
    with torch.no_grad():
        next(engine.teacher.module.parameters()).add_(1e-3)
    with pytest.raises(RuntimeError, match="teacher's weights changed"):
        engine.teacher.check_unchanged()


@pytest.mark.slow
def test_bad_teacher_is_one_line_and_exit_2(tmp_path, capsys, teacher_run, fake_cifar):
    code = main(["distill", "--teacher", str(tmp_path / "nowhere"), *TINY, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and err.count("\n") == 1
    code = main(["distill", "--teacher", f"{teacher_run}:9", *TINY, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "has no level 9" in err and "saved levels: 0, 1, 2, 3" in err
    other = tmp_path / "t100"
    assert main(["train", *TINY, "--levels", "1", "--students", "none", "--dataset", "cifar100", "--model", "mlp",
                 "--data-root", str(fake_cifar), "--noise", "0.2", "--out", str(other)]) == 0
    capsys.readouterr()
    code = main(["distill", "--teacher", f"{other}:0", *TINY, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "100 classes" in err and "has 10" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


FLAGS = ["--epochs", "12", "--dense-epochs", "12", "--levels", "3", "--quiet", "--seed", "4", "--checkpoint-every", "0"]


@pytest.mark.slow
def test_student_run_survives_sigkill_and_resumes(tmp_path, teacher_run):
    env = engine_env()
    cmd = [*ENGINE, "distill", "--teacher", f"{teacher_run}:best", *FLAGS]
    subprocess.run([*cmd, "--out", str(tmp_path / "ref")], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(run)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(run / "epochs.jsonl") if (run / "epochs.jsonl").exists() else []
        if any(r["level"] == 1 and r["epoch"] >= 3 for r in rows):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed, "the run finished before it could be killed"
    out = subprocess.run([*cmd, "--out", str(run)], check=True, env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert "resuming" in out.stdout
    assert stable(read_jsonl(run / "metrics.jsonl")) == stable(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert stable(read_jsonl(run / "epochs.jsonl")) == stable(read_jsonl(tmp_path / "ref" / "epochs.jsonl"))


@pytest.mark.slow
def test_main_job_runs_the_whole_experiment(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for kind in ("vanilla", "kd-dense", "kd-sparse"):
        assert f"student {kind}:" in printed
        assert (out / "students" / kind / "summary.json").exists()
    for name in ("fig2_teacher.png", "fig5_students.svg", "table1.csv", "curve_kd-sparse.csv"):
        assert (out / "report" / name).stat().st_size > 0
    data = json.loads((out / "report" / "figure_data.json").read_text())
    sparse = next(g for g in data["fig5_students"]["groups"] if "sparse" in g["label"])
    rows = read_jsonl(out / "students" / "kd-sparse" / "metrics.jsonl")
    assert sparse["test_acc_pct"] == pytest.approx([r["test_acc"] * 100 for r in rows])
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--levels", "20", "--students", "vanilla", "--student-hidden", "1"], "20 levels cannot be reached"),
    (["--teacher-level", "9", "--students", "kd-sparse"], "teacher level 9 is beyond"),
])
def test_student_problems_are_found_before_the_teacher_trains(tmp_path, capsys, args, words):
    out = tmp_path / "exp"
    code = main(["train", "--epochs", "1", "--dense-epochs", "1", "--levels", "3", "--quiet", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and words in err and not out.exists()


@pytest.mark.slow
def test_experiments_with_different_configs_are_not_pooled(tmp_path, capsys):
    from dsd2.report import write_experiment_report
    from dsd2.runs import RunError

    for name, noise in (("a", "0.1"), ("b", "0.6")):
        assert main(["train", *TINY, "--students", "vanilla", "--noise", noise, "--out", str(tmp_path / name)]) == 0
    with pytest.raises(RunError, match="differ in data.noise"):
        write_experiment_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
