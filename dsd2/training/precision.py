"""Training precision: where `--precision auto` is decided, once, from the model a run actually trains.

bf16 autocast pays where the hardware computes bf16 natively: GPUs from compute capability 8.0 (Ampere) on, and
CPUs with AVX-512 BF16 or AMX (x86-64) or the BF16 extension (aarch64), where oneDNN runs bf16 convolutions and
matrix products. Elsewhere a CPU emulates bf16 through fp32 conversions, many times slower than fp32. Small MLPs
lose in both cases (autocast's casts cost more than bf16 matrix products save), so `auto` keeps every model without
a convolution in fp32.

`concrete_precision` makes a config's `auto` concrete before the run is named, so the stored config and the run
hash name the precision the run trains in: the same command on a machine where auto means otherwise names another
run instead of resuming this one.
"""

from __future__ import annotations

import dataclasses
import functools
import platform

import torch
from torch import nn

from dsd2.config import Config

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86-64 (/proc/cpuinfo flags), aarch64 (Features)
EMULATED_BF16_WARNING = ("bf16 on this CPU is emulated (no AVX-512 BF16 or AMX): expect training about 10x "
                         "slower than fp32; --precision auto or fp32 avoids it")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` ("cpu", "cuda", "cuda:N", "auto") computes bf16 matrix products and convolutions natively:
    CPUs with AVX-512 BF16, AMX or the aarch64 BF16 extension, GPUs of compute capability 8.0 and later."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if platform.system() == "Darwin":
        return False
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def is_conv_net(model: nn.Module) -> bool:
    """Whether `model` convolves (bf16 where native, and channels_last, apply to such nets)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def decide_precision(requested: str, device: str | torch.device, model: nn.Module) -> str:
    """The precision a run of `model` trains in: `requested` unless it is auto; auto is bf16 for a conv net on a
    device with native bf16, else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if is_conv_net(model) and native_bf16(device) else "fp32"


def concrete_precision(cfg: Config, model: nn.Module | None = None) -> Config:
    """`cfg` with `auto` decided for the model it trains: `model` (one given to the Python API), else the built-in
    one its config names, built on the meta device (no memory, no initialisation)."""
    if cfg.precision != "auto":
        return cfg
    if model is None:
        from dsd2.models import build_model

        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(cfg.model, (3, 32, 32), 10)  # what convolves does not depend on the shapes
    return dataclasses.replace(cfg, precision=decide_precision("auto", cfg.device, model))


def teacher_precision(precision: str, device: torch.device) -> str:
    """A KD teacher only infers: on a GPU in bf16 whatever the student trains in, on a CPU in the student's."""
    return "bf16" if device.type == "cuda" else precision


def precision_note(precision: str, device: torch.device) -> tuple[str, str | None]:
    """(the log line naming the precision in use, a warning line where bf16 is emulated, or None)."""
    native = native_bf16(device)
    line = f"precision: {precision} (bf16 {'native' if native else 'emulated'} on this {device.type})"
    warning = EMULATED_BF16_WARNING if precision == "bf16" and device.type == "cpu" and not native else None
    return line, warning
