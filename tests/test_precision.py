"""--precision auto: bf16 only for conv nets where the device computes it natively, made concrete when the config
is built (so the run hash names the precision trained in); a warning where bf16 is emulated."""

from __future__ import annotations

import torch

from dsd2 import config as C
from dsd2.training import precision as P

CPU = torch.device("cpu")


def with_flags(monkeypatch, *flags):
    monkeypatch.setattr(C, "cpu_flags", lambda: frozenset(flags))


def test_auto_takes_bf16_for_conv_nets_on_native_bf16_cpus_only(monkeypatch):
    with_flags(monkeypatch, "avx2", "avx512f", "avx512_bf16")
    assert C.auto_precision("cpu", conv_net=True) == "bf16"
    assert C.auto_precision("cpu", conv_net=False) == "fp32"
    with_flags(monkeypatch, "avx2", "amx_bf16")
    assert C.auto_precision("cpu", conv_net=True) == "bf16"
    with_flags(monkeypatch, "avx2", "fma")
    assert C.auto_precision("cpu", conv_net=True) == "fp32"
    assert P.resolve_precision("bf16", CPU, conv_net=False) == "bf16"
    assert P.resolve_precision("fp32", CPU, conv_net=True) == "fp32"
    assert P.resolve_precision("auto", CPU, conv_net=True) == "fp32"


def test_build_config_makes_auto_concrete_and_the_hash_names_it(monkeypatch):
    with_flags(monkeypatch, "avx2", "fma")
    vgg = {"model": {"name": "vgg"}}
    emulated = C.build_config("cifar10-vgg", None, vgg)
    assert emulated.precision == "fp32"
    assert emulated.run_hash() == C.build_config("cifar10-vgg", None, {**vgg, "precision": "fp32"}).run_hash()
    with_flags(monkeypatch, "avx512_bf16")
    native = C.build_config("cifar10-vgg", None, vgg)
    assert native.precision == "bf16" and native.run_hash() != emulated.run_hash()
    assert C.build_config().precision == "fp32"  # the digits MLP: fp32 everywhere


def test_emulated_bf16_warns_in_one_line(monkeypatch):
    with_flags(monkeypatch, "avx2", "fma")
    line, warning = P.precision_note("bf16", CPU)
    assert line == "precision: bf16 (bf16 emulated on this cpu)"
    assert warning is not None and "\n" not in warning and "10x slower" in warning
    assert P.precision_note("fp32", CPU) == ("precision: fp32 (bf16 emulated on this cpu)", None)
    with_flags(monkeypatch, "avx512_bf16")
    assert P.precision_note("bf16", CPU) == ("precision: bf16 (bf16 native on this cpu)", None)


def test_engine_logs_the_precision_and_the_warning(tmp_path, tiny_config, monkeypatch):
    from dsd2.run import LevelLoop
    from dsd2.runs import RunDir

    with_flags(monkeypatch, "avx2", "fma")
    cfg = tiny_config(precision="bf16", prune__levels=0, optim__dense_epochs=1)
    lines = []
    LevelLoop(cfg, RunDir(tmp_path / "run"), progress=False, log=lines.append).run()
    assert "precision: bf16 (bf16 emulated on this cpu)" in lines
    assert [line for line in lines if line.startswith("warning: ")] == [f"warning: {P.EMULATED_BF16_WARNING}"]
