"""Ahead-of-time compilation of every Triton kernel variant the launchers plan, for sm_80 and sm_90, on any machine.

    python -m dsd2.kernels.aot [--json FILE]

The variants come from the launchers' own planners (`plan_kd`, `plan_counting`, `plan_sgd`, `plan_matmul`,
`plan_conv_*`) called on meta tensors: fp32, bf16 and fp16 inputs, the KD configurations picked for C from 10 to
32000 (every tile width, the split and the persistent chunked kernels) at a small and a large batch and the KD
backward's scaling, every counting mode (per element or channel, NCHW or NHWC, counting alone or with the ReLU,
> 0 or >= 0, with or without atomics), every masked-SGD mode, and the masked layers' products (linear: forward, dX,
dW; conv: forward, input and weight gradients, NCHW and channels_last, IEEE and TF32 fp32; the mask as bool bytes
and bit-packed) on the MLP's, VGG-like's and ResNet-18's shapes. Each goes through Triton's own JIT binder and
argument packing, so it gets exactly the specialisation a launch would (integer arguments equal to 1 become
constants, 16-byte alignment and divisibility hints), and is compiled to a cubin (no GPU needed); its resources
are read with the cuobjdump that ships with Triton: registers, stack, local memory (spills) and shared memory per
kernel. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from .kd_loss import plan_kd, plan_kd_reductions, plan_kd_scale
from .launch import Launch
from .masked_conv2d import plan_conv_forward, plan_conv_input_grad, plan_conv_weight_grad
from .masked_linear import dot_precision, plan_matmul
from .masked_sgd import plan_sgd
from .relu_count import plan_counting

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KD_CLASSES = (10, 20, 40, 100, 200, 400, 1000, 2000, 4000, 32000)  # every tile width 16..4096, and the wide path
KD_BATCHES = (8, 8192)
# tile kernels: every live array in registers; a spill there is a performance bug
TILE_KERNELS = ("_kd_tile_kernel", "_kd_chunked_kernel", "_kd_split_stats_kernel", "_kd_split_grad_kernel",
                "_count_cols_kernel", "_count_channels_kernel", "_masked_matmul_kernel", "_conv_fwd_kernel",
                "_conv_dgrad_kernel", "_conv_wgrad_kernel")
META = torch.device("meta")
# Per-SM limits that bound how many CTAs run at once: register file, threads, shared memory (the most one SM
# offers to CTAs), resident CTAs. sm_80 (A100) and sm_90 (H100/H200) share all but shared memory.
SM_LIMITS = {
    "sm_80": {"regs": 65536, "threads": 2048, "shared": 164 * 1024, "ctas": 32},
    "sm_90": {"regs": 65536, "threads": 2048, "shared": 228 * 1024, "ctas": 32},
}
REG_ALLOC_UNIT = 256  # registers are given to a warp in blocks of 256 (8 per thread)
CTA_RESERVED_SHARED = 1024  # bytes of shared memory the driver keeps per CTA on sm_80 and later


def ctas_per_sm(regs: int, warps: int, shared: int, arch: str = "sm_90") -> int:
    """How many CTAs of a kernel fit on one SM at once: `regs` registers per thread, `warps` warps per CTA and
    `shared` bytes of shared memory per CTA (static and dynamic), against `arch`'s limits (SM_LIMITS). 0 when one
    CTA does not fit."""
    if arch not in SM_LIMITS:
        raise ValueError(f"arch '{arch}' has no SM limits here; allowed: {', '.join(SM_LIMITS)}")
    if not (0 <= regs <= 255 and warps >= 1 and shared >= 0):
        raise ValueError(f"regs={regs}, warps={warps}, shared={shared}: need 0 <= regs <= 255, warps >= 1, "
                         "shared >= 0")
    limit = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = limit["regs"] // regs_per_warp // warps
    by_threads = limit["threads"] // (32 * warps)
    by_shared = limit["shared"] // (shared + CTA_RESERVED_SHARED)
    return min(by_regs, by_threads, by_shared, limit["ctas"])


def kd_launches() -> list[Launch]:
    out = []
    for dtype, c, b in itertools.product(DTYPES, KD_CLASSES, KD_BATCHES):
        s = torch.empty(b, c, dtype=dtype, device=META)
        y = torch.empty(b, dtype=torch.int64, device=META)
        n = torch.empty((), dtype=torch.int64, device=META)
        rows = torch.empty(b, dtype=torch.float32, device=META)
        out.extend(plan_kd(s, torch.empty_like(s), y, n, torch.empty_like(s), rows, torch.empty_like(rows), 0.8,
                           10.0, -100))
        if b == KD_BATCHES[-1]:
            out.append(plan_kd_scale(torch.empty_like(s), torch.empty((), dtype=torch.float32, device=META)))
    scalar = torch.empty((), dtype=torch.float32, device=META)
    out.extend(plan_kd_reductions(y, n, rows, torch.empty_like(rows), (scalar, scalar, scalar), 0.8, 10.0, -100))
    return out


# shapes that reach every counting variant: (shape, channels_last, per_channel)
COUNT_SHAPES = [
    ((65536, 10), False, False),           # few columns, many rows: row splits with atomics
    ((4, 1 << 20), False, False),          # many columns: one program per column tile, no atomics
    ((64, 32, 16, 16), True, False),       # NHWC per element, split rows
    ((2, 64, 128, 128), True, False),      # NHWC per element, no split
    ((256, 8, 16, 16), False, True),       # per channel over positions, split
    ((1, 2048, 32, 32), False, True),      # per channel, many channels, no split
    ((64, 32, 16, 16), True, True),        # NHWC per channel: the column kernel
]


def counting_launches() -> list[Launch]:
    out = []
    for dtype, (shape, nhwc, per_channel), write_out, inclusive in itertools.product(
            DTYPES, COUNT_SHAPES, (False, True), (False, True)):
        x = torch.empty(shape, dtype=dtype, device=META)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        n = shape[1] if per_channel else x[0].numel()
        launch, _ = plan_counting(x, torch.empty(n, dtype=torch.int64, device=META), inclusive, per_channel,
                                  write_out)
        out.append(launch)
    covered = {(la.name, *sorted((k, v) for k, v in la.constexprs.items() if isinstance(v, bool))) for la in out}
    flags = {"_count_cols_kernel": ("ATOMIC", "INCLUSIVE", "NHWC", "WRITE_OUT"),
             "_count_channels_kernel": ("ATOMIC", "INCLUSIVE", "WRITE_OUT")}
    for kernel, names in flags.items():
        for values in itertools.product((False, True), repeat=len(names)):
            if (kernel, *zip(names, values)) not in covered:
                raise AssertionError(f"no counting shape reaches {kernel} with {dict(zip(names, values))}")
    return out


def sgd_launches() -> list[Launch]:
    tables = torch.empty(3, 8, dtype=torch.int64, device=META)
    blocks = torch.empty(5, 2, dtype=torch.int32, device=META)
    numels = torch.empty(3, dtype=torch.int64, device=META)
    out = []
    for lr, (momentum, nesterov), aligned in itertools.product(
            (0.1, torch.empty((), dtype=torch.float32, device=META)), ((0.0, False), (0.9, False), (0.9, True)),
            (False, True)):
        out.append(plan_sgd(tables, blocks, numels, lr, momentum, 1e-4, nesterov, aligned))
    return out


# the masked layers' shapes at batch 128: an MLP's linear layer; conv layers (in, out, kernel, stride, input size,
# bias) of the VGG-like (3-channel stem: the narrow column tiles; 3x3 with bias) and of ResNet-18 (3x3 stride 2,
# 1x1 stride-2 shortcut, no bias) at CIFAR size
LINEAR_SHAPES = ((784, 300),)
CONV_SHAPES = ((3, 32, 3, 1, 32, True), (64, 64, 3, 1, 16, True), (64, 128, 3, 2, 32, False),
               (64, 128, 1, 2, 32, False))
PACKED_CONV_SHAPE = (64, 64, 3, 1, 16, True)  # the kernels' bit-packed mask variants, compiled on one shape


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    return tuple(dict.fromkeys(dot_precision(dtype, tf32) for tf32 in (False, True)))


def masked_linear_launches() -> list[Launch]:
    """The three products of a masked linear layer (forward with and without bias, dX, dW) per dtype and dot
    precision, with a bool mask and with a bit-packed one."""
    out = []
    for dtype, (i, o) in itertools.product(DTYPES, LINEAR_SHAPES):
        x = torch.empty(128, i, dtype=dtype, device=META)
        w = torch.empty(o, i, dtype=dtype, device=META)
        m = torch.empty(o, i, dtype=torch.bool, device=META)
        bits = torch.empty(-(-o * i // 8), dtype=torch.uint8, device=META)
        y = torch.empty(128, o, dtype=dtype, device=META)
        for precision in _precisions(dtype):
            for bias in (None, torch.empty(o, dtype=dtype, device=META)):
                out.append(plan_matmul(x, w.t(), y, m.t(), mask_b=True, bias=bias, precision=precision))
                out.append(plan_matmul(x, w.t(), y, bits, mask_b=True, bias=bias, precision=precision,
                                       mask_strides=(1, i)))
            out.append(plan_matmul(y, w, torch.empty_like(x), m, mask_b=True, precision=precision))
            out.append(plan_matmul(y.t(), x, torch.empty_like(w), m, mask_c=True, precision=precision))
            out.append(plan_matmul(y, w, torch.empty_like(x), bits, mask_b=True, precision=precision,
                                   mask_strides=(i, 1)))
            out.append(plan_matmul(y.t(), x, torch.empty_like(w), bits, mask_c=True, precision=precision,
                                   mask_strides=(i, 1)))
    return out


def masked_conv_launches() -> list[Launch]:
    """Forward, input gradient and weight gradient of a masked conv per dtype, dot precision and layout (NCHW,
    channels_last), over the VGG-like's and ResNet-18's conv shapes with a bool mask, and on one of them with a
    bit-packed mask."""
    out = []
    shapes = [(shape, False) for shape in CONV_SHAPES] + [(PACKED_CONV_SHAPE, True)]
    for dtype, ((c, oc, k, st, hw, has_bias), packed), nhwc in itertools.product(DTYPES, shapes, (False, True)):
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        pad = k // 2
        ohw = (hw + 2 * pad - k) // st + 1
        x = torch.empty(128, c, hw, hw, dtype=dtype, device=META).contiguous(memory_format=fmt)
        w = torch.empty(oc, c, k, k, dtype=dtype, device=META)
        m = torch.empty(oc, c, k, k, dtype=torch.bool, device=META)
        if packed:
            m = torch.empty(-(-m.numel() // 8), dtype=torch.uint8, device=META)
        y = torch.empty(128, oc, ohw, ohw, dtype=dtype, device=META).contiguous(memory_format=fmt)
        geometry = ((st, st), (pad, pad), (1, 1), 1)
        for precision in _precisions(dtype):
            bias = torch.empty(oc, dtype=dtype, device=META) if has_bias else None
            out.append(plan_conv_forward(x, w, m, bias, y, *geometry, precision))
            out.append(plan_conv_input_grad(y, w, m, torch.empty_like(x), *geometry, precision))
            out.append(plan_conv_weight_grad(y, x, m, w.shape, *geometry, precision)[0])
    return out


def jit_source(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict, list]:
    """(the source, compile options, specialisation) that `kernel[grid](*args, ...)` would compile for `target`:
    Triton's own binder and argument packing, as in `JITFunction.run`, without a device."""
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constexprs, **launch.options}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__, specialization


def variants() -> list[Launch]:
    """Every distinct specialisation (kernel, argument types and hints, constexprs, options) of the planned
    launches."""
    seen, out = set(), []
    for launch in (kd_launches() + counting_launches() + sgd_launches() + masked_linear_launches()
                   + masked_conv_launches()):
        _, _, specialization = jit_source(launch, TARGETS["sm_90"])
        key = (launch.name, str(specialization), json.dumps(launch.options, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError("cuobjdump not found (it ships with Triton's NVIDIA backend)")
    return found


def resources(cubin: bytes, tool: str) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def compile_all(targets: dict[str, GPUTarget] = TARGETS, workers: int | None = None) -> list[dict]:
    """Every variant's record, in `variants()` order. The compiles are independent and each runs on one core, so
    they are shared out over `workers` forked processes (default: one per core; 1 compiles here)."""
    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1:
        return _compile_share(targets, 0, 1)
    ctx = multiprocessing.get_context("fork")  # the children inherit the imported kernels; no GPU is touched
    with ctx.Pool(workers) as pool:
        shares = pool.starmap(_compile_share, [(targets, rank, workers) for rank in range(workers)])
    records: list[dict] = []
    for i in range(max(len(share) for share in shares)):  # interleaved back into one order
        records += [share[i] for share in shares if i < len(share)]
    return records


def _compile_share(targets: dict[str, GPUTarget], rank: int, workers: int) -> list[dict]:
    """The records of every `workers`-th (launch, target) pair from `rank`."""
    tool = cuobjdump()
    records = []
    pairs = [(launch, arch, target) for launch in variants() for arch, target in targets.items()]
    for launch, arch, target in pairs[rank::workers]:
        t0 = time.perf_counter()
        src, options, specialization = jit_source(launch, target)
        compiled = triton.compile(src, target=target, options=options)
        cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
        names = [p.name for p in launch.kernel.params]
        used = resources(cubin, tool)
        warps = compiled.metadata.num_warps
        shared = used["shared"] + compiled.metadata.shared  # static (cubin) and dynamic (Triton's) bytes
        records.append({
            "kernel": launch.name, "arch": arch, "grid_example": list(launch.grid),
            "signature": {n: kind for n, (kind, _) in zip(names, specialization) if kind != "constexpr"},
            "constexprs": {n: (v if isinstance(v, (bool, int, float)) else str(v))
                           for n, (kind, v) in zip(names, specialization) if kind == "constexpr"},
            "hints": {n: hint for n, (kind, hint) in zip(names, specialization) if kind != "constexpr" and hint},
            "options": launch.options, "cubin_bytes": len(cubin), **used, "num_warps": warps,
            "shared_total": shared, "ctas_per_sm": ctas_per_sm(used["reg"], warps, shared, arch),
            # 16- and 8-byte global accesses (ld/st.global.v4.b32, .v2.b32, ...): what alignment hints buy
            "vector_accesses": len(re.findall(r"\b(?:ld|st)\.global[\w:.]*?\.v[24]\b", ptx)),
            # atomics with acquire/release ordering: each one waits on memory order it does not need
            "ordered_atomics": len(re.findall(r"\batom\.[a-z.]*(acq_rel|acquire|release)", ptx)),
            "compile_s": round(time.perf_counter() - t0, 3),
        })
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every variant's record here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("dsd2.kernels.aot: unset TRITON_INTERPRET (the interpreter has no compiler)", file=sys.stderr)
        return 2
    records = compile_all()
    spills = [r for r in records if r["kernel"] in TILE_KERNELS and (r["local"] or r["stack"])]
    for r in records:
        print(f"{r['arch']}  {r['kernel']:<24} regs {r['reg']:>3}  stack {r['stack']:>4}  local {r['local']:>4}  "
              f"shared {r['shared']:>6}  {json.dumps(r['constexprs'], sort_keys=True)}  "
              f"{','.join(sorted(set(v for v in r['signature'].values() if v.startswith('*'))))}")
    print(f"{len(records)} cubins, {len(spills)} tile kernels with spills")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
