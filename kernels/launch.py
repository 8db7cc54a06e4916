"""One record per Triton launch: the launcher runs it, and the ahead-of-time compile checks compile exactly it.

Each kernel module plans its launches (grid, runtime arguments, constexprs, warps) in one function that the op
calls and then runs; `dsd2.kernels.aot` calls the same planners on meta tensors and compiles the result for sm_80
and sm_90 through Triton's own JIT binder, so what is compiled ahead of time cannot drift from what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
