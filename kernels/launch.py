"""One record per Triton launch: the launcher runs it, and the ahead-of-time compile checks compile exactly it.

Each kernel module plans its launches (grid, runtime arguments, constexprs, warps) in one function that the op
calls and then runs; `dsd2.kernels.aot` calls the same planners on meta tensors and compiles the result for sm_80
and sm_90, so what is compiled ahead of time cannot drift from what runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                torch.int32: "i32", torch.int8: "i8", torch.bool: "i1", torch.uint8: "u8"}


@dataclass
class Launch:
    kernel: Any  # a triton.jit function
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # num_warps, enable_fp_fusion

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def signature(self) -> dict[str, str]:
        """Triton's type string of every argument, as the JIT would infer it from this call's values."""
        fn = self.kernel.fn if hasattr(self.kernel, "fn") else self.kernel
        names = list(inspect.signature(fn).parameters)
        runtime = [n for n in names if n not in self.constexprs]
        if len(runtime) != len(self.args):
            raise TypeError(f"{self.name}: {len(self.args)} runtime arguments for parameters {runtime}")
        sig = {}
        for name, value in zip(runtime, self.args):
            if isinstance(value, torch.Tensor):
                sig[name] = "*" + TRITON_TYPES[value.dtype]
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{self.name}: argument {name} of type {type(value).__name__} has no Triton type")
        return {**sig, **{name: "constexpr" for name in self.constexprs}}
