"""Choosing the CPU level of the C++ kernels: DSD2_CPU_ISA, set_cpu_isa, `dsd2-engine info`, and agreement
between levels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ENGINE, engine_env

from dsd2.ops import cpu_isa, cpu_isa_levels, kd_loss, set_cpu_isa, use_cpu_isa

LEVELS = ("default", "avx2", "avx512")


def chosen_level() -> str:
    """The level in use: DSD2_CPU_ISA's (the whole suite can run at each level), else the best one."""
    return os.environ.get("DSD2_CPU_ISA") or cpu_isa_levels()[-1]


def test_default_is_always_there_and_the_chosen_level_runs():
    levels = cpu_isa_levels()
    assert levels[0] == "default"
    assert set(levels) <= set(LEVELS)
    assert cpu_isa() == chosen_level()


def test_unknown_level_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"CPU ISA level 'sse9' is not known; this CPU runs: default"):
        set_cpu_isa("sse9")
    assert cpu_isa() == chosen_level()


def test_level_this_cpu_lacks_is_refused():
    missing = [level for level in LEVELS if level not in cpu_isa_levels()]
    if not missing:
        pytest.skip("this CPU runs every level; the refusal is tested on CPUs that lack one")
    with pytest.raises(ValueError, match=f"'{missing[0]}' is not supported by this CPU"):
        set_cpu_isa(missing[0])


def run(code: str, cwd, **env) -> subprocess.CompletedProcess:
    # run outside the source tree, so that the installed dsd2 (with its built extension) is the one imported
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**engine_env(), **env}, timeout=120, cwd=cwd)


@pytest.mark.slow
def test_environment_variable_chooses_the_level(tmp_path):
    out = run("from dsd2.ops import cpu_isa; print(cpu_isa())", tmp_path, DSD2_CPU_ISA="default")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "default"


@pytest.mark.slow
def test_cli_refuses_a_bad_level_in_one_line_and_info_names_the_level(tmp_path):
    bad = subprocess.run([*ENGINE, "info"], capture_output=True, text=True, timeout=120,
                         env={**engine_env(), "DSD2_CPU_ISA": "avx9"}, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "dsd2-engine: error: DSD2_CPU_ISA=avx9: CPU ISA level 'avx9' is not known; this CPU runs: "
        + ", ".join(cpu_isa_levels())]
    good = subprocess.run([*ENGINE, "info"], capture_output=True, text=True, timeout=120,
                          env={**engine_env(), "DSD2_CPU_ISA": "default"}, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert f"cpu_isa: default (this CPU runs: {', '.join(cpu_isa_levels())}" in good.stdout
    assert "bf16: " in good.stdout


@pytest.mark.parametrize("b, c", [(37, 10), (37, 100), (5, 4097)])
def test_every_level_gives_the_default_levels_answer(b, c):
    """Same summation order on every level; only the exp and log polynomials may round differently (FMA)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(b, c, generator=g) * 4, torch.randn(b, c, generator=g) * 4
    y = torch.randint(0, c, (b,), generator=g)
    answers = {}
    for level in cpu_isa_levels():
        with use_cpu_isa(level):
            a = s.clone().requires_grad_()
            loss = kd_loss(a, t, y)
            loss.backward()
            answers[level] = (loss.detach(), a.grad)
    loss0, grad0 = answers["default"]
    for level, (loss, grad) in answers.items():
        assert abs(float(loss - loss0)) <= 16 * 2.0**-24 * abs(float(loss0)), level
        assert float((grad - grad0).abs().max()) <= 16 * 2.0**-24 * float(grad0.abs().max()), level


@pytest.mark.slow
def test_the_pruning_loop_gives_the_same_metrics_at_every_level(tmp_path):
    """A whole run with SGD and entropy counting: the SGD kernel is bit-identical across levels and counting is
    exact, so every metric of every level must be equal, not only close."""
    from dsd2.selftest import digits_run

    rows = {}
    for level in cpu_isa_levels():
        with use_cpu_isa(level):
            rows[level] = digits_run(tmp_path / level, analysis={"entropy": "pass"})
    assert any("entropy" in key for key in rows["default"][0])
    for level, got in rows.items():
        assert got == rows["default"], level
