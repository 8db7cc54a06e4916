"""--precision auto: bf16 only for conv nets where the device computes it natively; a warning where bf16 is
emulated."""

from __future__ import annotations

import torch

from dsd2.training import precision as P

CPU = torch.device("cpu")


def with_flags(monkeypatch, *flags):
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))


def test_auto_takes_bf16_for_conv_nets_on_native_bf16_cpus_only(monkeypatch):
    with_flags(monkeypatch, "avx2", "avx512f", "avx512_bf16")
    assert P.resolve_precision("auto", CPU, conv_net=True) == "bf16"
    assert P.resolve_precision("auto", CPU, conv_net=False) == "fp32"
    with_flags(monkeypatch, "avx2", "amx_bf16")
    assert P.resolve_precision("auto", CPU, conv_net=True) == "bf16"
    with_flags(monkeypatch, "avx2", "fma")
    assert P.resolve_precision("auto", CPU, conv_net=True) == "fp32"
    assert P.resolve_precision("bf16", CPU, conv_net=False) == "bf16"
    assert P.resolve_precision("fp32", CPU, conv_net=True) == "fp32"


def test_emulated_bf16_warns_in_one_line(monkeypatch):
    with_flags(monkeypatch, "avx2", "fma")
    line, warning = P.precision_note("bf16", CPU, conv_net=True)
    assert line == "precision: bf16"
    assert warning is not None and "\n" not in warning and "10x slower" in warning
    line, warning = P.precision_note("auto", CPU, conv_net=True)
    assert (line, warning) == ("precision: fp32 (auto: no native bf16 on this cpu)", None)
    with_flags(monkeypatch, "avx512_bf16")
    assert P.precision_note("bf16", CPU, conv_net=True) == ("precision: bf16", None)
    line = P.precision_note("auto", CPU, conv_net=True)[0]
    assert line == "precision: bf16 (auto: native bf16 on this device, conv net)"


def test_engine_logs_the_precision_and_the_warning(tmp_path, tiny_config, monkeypatch):
    from dsd2.engine import Engine
    from dsd2.runs import RunDir

    with_flags(monkeypatch, "avx2", "fma")
    cfg = tiny_config(precision="bf16", prune__levels=0, optim__dense_epochs=1)
    lines = []
    Engine(cfg, RunDir(tmp_path / "run"), progress=False, log=lines.append).run_loop()
    assert "precision: bf16" in lines
    assert [line for line in lines if line.startswith("warning: ")] == [f"warning: {P.EMULATED_BF16_WARNING}"]
