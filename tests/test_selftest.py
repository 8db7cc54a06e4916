"""`dsd2-engine selftest`: passes on this CPU at every instruction-set level, writes its JSON, fails (exit 1) when
an op disagrees with its reference, calls a deliberately slowed op "slow" (exit 1 under --strict), and says
"not compared" where there is nothing to compare with."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
import torch
from conftest import ENGINE, engine_env

from dsd2 import selftest
from dsd2.cli import main
from dsd2.ops import MaskedSGD, cpu_isa_levels, kd_loss_eager

TRAIN_STEP = "time: training step (VGG-like δ=2 γ=3, batch 64)"
OP_TIMINGS = ("time: kd_loss", "time: count states", "time: relu_count", "time: masked SGD step")


# A slowed op does the eager code it is timed against EXTRA times over before its own work: slower than eager by
# construction, on any machine, whatever the fused op's own speed.
EXTRA = 5


def slow_kd_loss(monkeypatch) -> None:
    real = selftest.kd_loss

    def kd_loss(s, t, y):  # the eager step, forward and backward, before ours
        for _ in range(EXTRA):
            torch.autograd.grad(kd_loss_eager(s, t, y), s)
        return real(s, t, y)
    monkeypatch.setattr(selftest, "kd_loss", kd_loss)


def slow_counting(monkeypatch) -> None:
    real_count, real_relu_count = selftest.count_positive_, selftest.relu_count

    def count_positive_(x, counts, **kwargs):
        freq = torch.zeros(x.shape[1:])
        for _ in range(EXTRA):
            selftest.eager_count_hook(x, freq)
        return real_count(x, counts, **kwargs)

    def relu_count(x, counts, **kwargs):
        freq = torch.zeros(x.shape[1:])
        for _ in range(EXTRA):
            selftest.eager_relu_and_hook(x, freq)
        return real_relu_count(x, counts, **kwargs)
    monkeypatch.setattr(selftest, "count_positive_", count_positive_)
    monkeypatch.setattr(selftest, "relu_count", relu_count)


def slow_masked_sgd(monkeypatch) -> None:
    real = MaskedSGD.step

    def step(self, *args, **kwargs):
        if not hasattr(self, "eager"):
            self.eager = torch.optim.SGD(self.param_groups[0]["params"], lr=0.01, momentum=0.9, weight_decay=1e-4)
        for _ in range(EXTRA):
            self.eager.step()
        return real(self, *args, **kwargs)
    monkeypatch.setattr(MaskedSGD, "step", step)


@pytest.mark.slow
def test_quick_selftest_passes_on_the_cpu_at_every_level(tmp_path):
    out = tmp_path / "selftest.json"
    done = subprocess.run([*ENGINE, "selftest", "--quick", "--device", "cpu", "--strict", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, env=engine_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    levels = cpu_isa_levels()
    assert report["environment"]["cpu_isa_levels"] == levels
    checks = report["checks"]
    assert {c["result"] for c in checks} <= set(selftest.RESULTS)
    assert not [c for c in checks if c["result"] in ("FAIL", "slow")]
    skipped = {c["name"] for c in checks if c["result"] == "skipped"}
    assert skipped == {"graphed training step = eager steps", "captured evaluation = eager predict",
                       "captured counting pass = eager counts"}  # CUDA graphs: no CUDA device here
    for level in levels:
        for op in ("kd_loss", "count + relu_count", "masked SGD"):
            assert any(c["name"].startswith(op) and c["name"].endswith(f"[{level}]") for c in checks), (op, level)
    runs = [c for c in checks if c["name"].startswith("two-level digits run")]
    if len(levels) > 1:
        assert [(c["name"], c["result"]) for c in runs] == [
            (f"two-level digits run [{level}] = [{levels[0]}]", "pass") for level in levels[1:]]
    else:
        assert [c["result"] for c in runs] == ["not compared"]
    for prefix in OP_TIMINGS:  # each op timed against its eager baseline, with the ratio and the threshold
        (c,) = [c for c in checks if c["name"].startswith(prefix)]
        assert c["result"] == "pass" and c["min_speedup"] == pytest.approx(1 / selftest.SLOW_FACTOR)
        assert c["speedup"] == pytest.approx(c["baseline_s"] / c["time_s"]) and c["speedup"] >= c["min_speedup"]
        assert f"slow below {c['min_speedup']:.2f}x" in c["detail"]
    (step,) = [c for c in checks if c["name"] == TRAIN_STEP]  # eager on the CPU: no graph path to compare with
    assert step["result"] == "not compared" and step["speedup"] is None and step["time_s"] > 0
    assert "passed, 0 failed, 0 slow" in done.stdout


def test_a_wrong_op_fails_the_check(monkeypatch):
    real = selftest.kd_loss
    monkeypatch.setattr(selftest, "kd_loss", lambda s, t, y: real(s, t, y) * 1.001)
    checks = selftest.kd_checks(torch.device("cpu"), [(9, 10)], (torch.float32,), "")
    assert [c.result for c in checks] == ["FAIL"]


def test_a_failed_check_makes_the_exit_code_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "run_selftest", lambda device, quick: [
        selftest.Check("kd_loss fp32", "FAIL", "loss err 1e-2"), selftest.Check("count", "pass")])
    assert main(["selftest", "--device", "cpu"]) == 1
    assert "1 passed, 1 failed, 0 slow, 0 not compared, 0 skipped" in capsys.readouterr().out


def test_a_slowed_op_is_slow_and_fails_under_strict(monkeypatch, tmp_path, capsys):
    slow_kd_loss(monkeypatch)
    # only the timings: the other parts are tested above
    monkeypatch.setattr(selftest, "op_checks", lambda device, quick: [])
    monkeypatch.setattr(selftest, "run_checks", lambda device: [])
    out = tmp_path / "selftest.json"
    assert main(["selftest", "--quick", "--device", "cpu", "--strict", "--json", str(out)]) == 1
    checks = json.loads(out.read_text())["checks"]
    slow = [c["name"] for c in checks if c["result"] == "slow"]
    assert slow == ["time: kd_loss fwd+bwd B=1024 C=100"], [(c["name"], c["speedup"]) for c in checks]
    (kd,) = [c for c in checks if c["result"] == "slow"]
    assert kd["speedup"] < kd["min_speedup"] == pytest.approx(1 / selftest.SLOW_FACTOR)
    assert "1 slow" in capsys.readouterr().out
    assert selftest.exit_code([selftest.Check(**c) for c in checks]) == 0  # not a failure without --strict


def test_every_op_timing_is_slow_when_its_op_is_slowed(monkeypatch):
    slow_kd_loss(monkeypatch)
    slow_counting(monkeypatch)
    slow_masked_sgd(monkeypatch)
    checks = selftest.timing_checks(torch.device("cpu"), quick=True)
    got = {prefix: [c.result for c in checks if c.name.startswith(prefix)] for prefix in OP_TIMINGS}
    assert got == {prefix: ["slow"] for prefix in OP_TIMINGS}, [(c.name, c.speedup) for c in checks]
    assert selftest.exit_code(checks) == 0 and selftest.exit_code(checks, strict=True) == 1


@pytest.mark.slow
def test_a_slowed_graph_replay_is_slow(monkeypatch):
    """The training step's graph-against-eager timing, through the CPU graph emulator (the fused ops'
    plain-PyTorch paths, which it can record), with each replay made to run 20 times (the emulator replays the
    very operations an eager step runs, so a load slows both alike)."""
    import importlib

    from graph_emulator import EmulatedGraphs

    from dsd2.training.graphs import GraphedTrainStep

    for name in ("kd_loss", "masked_sgd", "relu_count"):
        monkeypatch.setattr(importlib.import_module(f"dsd2.ops.{name}"), "cpp_extension", lambda: None)
    real = GraphedTrainStep.replay

    def replay(self, idx, lr):
        for _ in range(20):
            real(self, idx, lr)
    monkeypatch.setattr(GraphedTrainStep, "replay", replay)
    check = selftest.train_step_timing(torch.device("cpu"), 0.05, graphs=EmulatedGraphs())
    assert check.result == "slow" and check.speedup < check.min_speedup, (check.speedup, check.detail)


def test_a_single_level_cpu_compares_nothing(monkeypatch):
    monkeypatch.setattr(selftest, "cpu_isa_levels", lambda: cpu_isa_levels()[:1])
    (check,) = selftest.run_checks(torch.device("cpu"))
    assert check.result == "not compared", (check.name, check.detail)
    assert "one instruction-set level" in check.detail


def fake_levels(monkeypatch, levels: list[str], rows_at) -> None:
    """The run check on a CPU with `levels`, each level's run giving the metrics `rows_at(level)`."""
    now = [None]

    @contextlib.contextmanager
    def at(level):
        now[0] = level
        yield
        now[0] = None

    monkeypatch.setattr(selftest, "cpu_isa_levels", lambda: levels)
    monkeypatch.setattr(selftest, "use_cpu_isa", at)
    monkeypatch.setattr(selftest, "digits_run", lambda root, **overrides: rows_at(now[0]))


def test_levels_with_different_metrics_fail(monkeypatch):
    fake_levels(monkeypatch, ["default", "avx2", "avx512"],
                lambda level: [{"level": 1, "test_acc": 0.51 if level == "avx512" else 0.5}])
    checks = selftest.run_checks(torch.device("cpu"))
    assert [(c.name, c.result) for c in checks] == [("two-level digits run [avx2] = [default]", "pass"),
                                                    ("two-level digits run [avx512] = [default]", "FAIL")]


def test_without_the_extension_the_run_is_not_compared(monkeypatch):
    fake_levels(monkeypatch, [], lambda level: [{"level": 1, "test_acc": 0.5}])
    (check,) = selftest.run_checks(torch.device("cpu"))
    assert (check.name, check.result) == ("two-level digits run", "not compared")
    assert "dsd2._C is not built" in check.detail


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_bad_device_is_one_line(device, tmp_path):
    done = subprocess.run([*ENGINE, "selftest", "--device", device], cwd=tmp_path, capture_output=True, text=True,
                          env=engine_env(), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dsd2-engine: error: device '{device}' is not known; allowed: cpu, cuda, cuda:N, auto"]


def test_graph_checks_pass_through_the_cpu_graph_emulator(monkeypatch):
    """The selftest's CUDA-graph checks, run here on the emulator (the fused ops' plain-PyTorch paths, which the
    emulator can record), so their code is exercised before any GPU runs it."""
    import importlib

    from graph_emulator import EmulatedGraphs

    for name in ("kd_loss", "masked_sgd", "relu_count"):
        monkeypatch.setattr(importlib.import_module(f"dsd2.ops.{name}"), "cpp_extension", lambda: None)
    checks = selftest.graph_checks(torch.device("cpu"), graphs=EmulatedGraphs())
    assert [c.result for c in checks] == ["pass"] * 3, [(c.name, c.detail) for c in checks]
