"""--precision auto: bf16 only for conv nets where the device computes it natively, decided in one place
(dsd2/training/precision.py) from the model the run trains, and made concrete before the run is named (so the run
hash names the precision trained in); a warning where bf16 is emulated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsd2 import config as C
from dsd2.training import precision as P

CPU = torch.device("cpu")


def with_flags(monkeypatch, *flags):
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


MLP = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def test_auto_takes_bf16_for_conv_nets_on_native_bf16_cpus_only(monkeypatch):
    conv = TinyConvNet()
    with_flags(monkeypatch, "avx2", "avx512f", "avx512_bf16")
    assert P.decide_precision("auto", "cpu", conv) == "bf16"
    assert P.decide_precision("auto", "cpu", MLP) == "fp32"
    with_flags(monkeypatch, "avx2", "amx_bf16")
    assert P.decide_precision("auto", CPU, conv) == "bf16"
    with_flags(monkeypatch, "avx2", "fma")
    assert P.decide_precision("auto", "cpu", conv) == "fp32"
    assert P.decide_precision("bf16", CPU, MLP) == "bf16"  # asked for explicitly: kept
    assert P.decide_precision("fp32", CPU, conv) == "fp32"


def test_the_config_is_made_concrete_for_its_model_and_the_hash_names_it(monkeypatch):
    with_flags(monkeypatch, "avx2", "fma")
    vgg = {"model": {"name": "vgg"}}
    assert C.build_config("cifar10-vgg", None, vgg).precision == "auto"  # the config layer decides nothing
    emulated = P.concrete_precision(C.build_config("cifar10-vgg", None, vgg))
    assert emulated.precision == "fp32"
    assert emulated.run_hash() == C.build_config("cifar10-vgg", None, {**vgg, "precision": "fp32"}).run_hash()
    with_flags(monkeypatch, "avx512_bf16")
    native = P.concrete_precision(C.build_config("cifar10-vgg", None, vgg))
    assert native.precision == "bf16" and native.run_hash() != emulated.run_hash()
    assert P.concrete_precision(C.build_config()).precision == "fp32"  # the digits MLP: fp32 everywhere
    assert P.concrete_precision(C.build_config(None, None, {"precision": "bf16"})).precision == "bf16"


@pytest.mark.parametrize("name", C.MODELS)
def test_a_built_in_model_is_judged_by_the_module_it_builds(monkeypatch, name):
    from dsd2.models import build_model

    with_flags(monkeypatch, "avx512_bf16")
    cfg = C.build_config(None, None, {"model": {"name": name}, "data": {"dataset": "cifar10"}})
    built = build_model(cfg.model, (3, 32, 32), 10)
    assert P.concrete_precision(cfg).precision == ("bf16" if P.is_conv_net(built) else "fp32")
    assert P.is_conv_net(built) == (name in C.CONV_MODELS)


def test_the_api_decides_from_the_users_own_module(monkeypatch):
    from dsd2.api import api_config, raw_dataset

    with_flags(monkeypatch, "avx512_bf16")
    images, labels = torch.rand(24, 3, 8, 8), torch.arange(24) % 10
    raw = raw_dataset((images, labels), (images, labels), None, 10)
    assert api_config(None, TinyConvNet(), raw, None, ("*",), ()).precision == "bf16"
    assert api_config(None, MLP, raw, None, ("*",), ()).precision == "fp32"
    with_flags(monkeypatch, "avx2", "fma")
    assert api_config(None, TinyConvNet(), raw, None, ("*",), ()).precision == "fp32"


def test_a_loop_given_auto_trains_and_names_the_decided_precision(tmp_path, tiny_config, monkeypatch):
    from dsd2.run import LevelLoop
    from dsd2.runs import RunDir

    cfg = tiny_config(prune__levels=0, optim__dense_epochs=1)
    cfg.precision = "auto"  # a Config built by hand
    loop = LevelLoop(cfg, RunDir(tmp_path / "run"), progress=False, log=lambda line: None)
    assert loop.precision == loop.cfg.precision == "fp32"
    assert loop.run()["run_hash"] == P.concrete_precision(cfg).run_hash()


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
