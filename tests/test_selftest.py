"""`dsd2-engine selftest`: passes on this CPU at every instruction-set level, writes its JSON, and fails (exit 1)
when an op disagrees with its reference."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ENGINE, engine_env

from dsd2 import selftest
from dsd2.cli import main
from dsd2.ops import cpu_isa_levels


def test_quick_selftest_passes_on_the_cpu_at_every_level(tmp_path):
    out = tmp_path / "selftest.json"
    done = subprocess.run([*ENGINE, "selftest", "--quick", "--device", "cpu", "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, env=engine_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["cpu_isa_levels"] == cpu_isa_levels()
    checks = report["checks"]
    assert not [c for c in checks if c["result"] == "FAIL"]
    skipped = {c["name"] for c in checks if c["result"] == "skipped"}
    assert skipped == {"graphed training step = eager steps", "captured evaluation = eager predict",
                       "captured counting pass = eager counts"}  # CUDA graphs: no CUDA device here
    for level in cpu_isa_levels():
        for op in ("kd_loss", "count + relu_count", "masked SGD"):
            assert any(c["name"].startswith(op) and c["name"].endswith(f"[{level}]") for c in checks), (op, level)
    assert any(c["name"].startswith("time: kd_loss") and c["speedup"] > 0 for c in checks)
    assert "passed, 0 failed" in done.stdout


def test_a_wrong_op_fails_the_check(monkeypatch):
    real = selftest.kd_loss
    monkeypatch.setattr(selftest, "kd_loss", lambda s, t, y: real(s, t, y) * 1.001)
    checks = selftest.kd_checks(torch.device("cpu"), [(9, 10)], (torch.float32,), "")
    assert [c.result for c in checks] == ["FAIL"]


def test_a_failed_check_makes_the_exit_code_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "run_selftest", lambda device, quick: [
        selftest.Check("kd_loss fp32", "FAIL", "loss err 1e-2"), selftest.Check("count", "pass")])
    assert main(["selftest", "--device", "cpu"]) == 1
    assert "1 passed, 1 failed, 0 skipped" in capsys.readouterr().out


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
