"""Masked layers (MaskedConv2d / MaskedLinear) against torch.nn.utils.prune's hooked layer and the plain layer, all
measured in one run on this machine, plus the level loop's epoch time before and after the switch, and a GPU estimate
from the Triton kernels' PTX.

    python benchmarks/ops/bench_masked_layers.py [--quick] [--json FILE] [--no-loop] [--no-gpu-estimate]

1. Layers, CPU, forward + backward (dX and dW) at batch 128: the VGG-like's (delta 5, gamma 5) and ResNet-18's conv
   shapes at CIFAR size, and the linear layers of the digits MLP (64-256-256-10) and of LeNet-300-100. Variants,
   timed round-robin for at least 40 rounds (each round runs every variant once, so drift in the machine's load
   hits them alike; a ratio is the median of the ratios within rounds, with its distribution-free 95 % interval;
   a layer whose interval spans over 3 % gets further rounds, up to four times its minimum time):
   `plain` (the layer the loop trained before: dsd2's Conv2d, nn.Linear), `hooked` (the same layer under
   torch.nn.utils.prune.custom_from_mask), `masked` (our layer: oneDNN on W⊙M from the C++ pass), `masked-where`
   (the same with W⊙M made by torch.where, the alternative to the C++ pass). 80 % of each weight pruned.
2. The loop, CPU: one training step of the whole digits MLP and VGG-like (forward, backward, masked SGD; bf16
   autocast where native, as `auto` picks) plain against masked, round-robin; and whole runs' epochs (the VGG-like
   on 1024 random 32x32 images) with the plain layers and with the masked ones, runs ordered A B B A A B B A.
3. GPU on paper (an estimate, not a measurement): per call, the bytes the masked kernels load per tile, read off
   the sm_90 PTX of their main loop, against the tile sizes (W and M once per tile), and the DRAM bytes of one
   forward + backward against the hooked layer's, which writes and reads W⊙M and dW⊙M in extra passes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.utils.prune as prune
from torch import nn

from dsd2.analysis.stats import median_ci
from dsd2.models import Conv2d
from dsd2.ops import MaskedConv2d, MaskedLinear, cpu_isa, cpu_model

BATCH = 128
DENSITY = 0.2
# (name, in, out, kernel, stride, input size, bias)
VGG_CONVS = [(f"vgg b{k} {cin}->{cout} @{s}", cin, cout, 3, 1, s, True) for k, cin, cout, s in (
    (1, 3, 32, 32), (1, 32, 32, 32), (2, 32, 64, 16), (2, 64, 64, 16), (3, 64, 128, 8), (3, 128, 128, 8),
    (4, 128, 256, 4), (4, 256, 256, 4), (5, 256, 512, 2), (5, 512, 512, 2))]
RESNET_CONVS = [
    ("resnet stem 3->64 @32", 3, 64, 3, 1, 32, False), ("resnet 64->64 @32", 64, 64, 3, 1, 32, False),
    ("resnet 64->128 s2 @32", 64, 128, 3, 2, 32, False), ("resnet 1x1 64->128 s2 @32", 64, 128, 1, 2, 32, False),
    ("resnet 128->128 @16", 128, 128, 3, 1, 16, False), ("resnet 128->256 s2 @16", 128, 256, 3, 2, 16, False),
    ("resnet 1x1 128->256 s2 @16", 128, 256, 1, 2, 16, False), ("resnet 256->256 @8", 256, 256, 3, 1, 8, False),
    ("resnet 256->512 s2 @8", 256, 512, 3, 2, 8, False), ("resnet 1x1 256->512 s2 @8", 256, 512, 1, 2, 8, False),
    ("resnet 512->512 @4", 512, 512, 3, 1, 4, False)]
LINEARS = [("mlp 64->256", 64, 256), ("mlp 256->256", 256, 256), ("mlp 256->10", 256, 10),
           ("lenet300 784->300", 784, 300), ("lenet300 300->100", 300, 100), ("lenet300 100->10", 100, 10)]
VARIANTS = ("plain", "hooked", "masked", "masked-where")


# ---- 1. layers -----------------------------------------------------------------------------------------------

def layer_variants(kind: str, shape: tuple) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The four variants of one layer over the same masked weight, and an input (channels_last for convs, as the
    loop feeds conv nets)."""
    torch.manual_seed(0)
    if kind == "conv":
        _, cin, cout, k, stride, size, bias = shape
        plain = Conv2d(cin, cout, k, stride, k // 2, bias=bias).to(memory_format=torch.channels_last)
        x = torch.randn(BATCH, cin, size, size).contiguous(memory_format=torch.channels_last)
    else:
        _, cin, cout = shape
        plain = nn.Linear(cin, cout)
        x = torch.randn(BATCH, cin)
    mask = torch.rand(plain.weight.shape) < DENSITY
    with torch.no_grad():
        plain.weight.mul_(mask)
    hooked = copy.deepcopy(plain)
    prune.custom_from_mask(hooked, "weight", mask)
    masked_type = MaskedConv2d if kind == "conv" else MaskedLinear
    masked = masked_type.from_dense(copy.deepcopy(plain), mask)
    where = WhereMasked(copy.deepcopy(plain), mask)
    return {"plain": plain, "hooked": hooked, "masked": masked, "masked-where": where}, x.requires_grad_()


class WhereMasked(nn.Module):
    """The plain layer run on torch.where(mask, weight, 0): the masked layer with torch making W⊙M in place of the
    C++ pass (everything else, the small-map weight gradient included, as the plain layer does it)."""

    def __init__(self, layer: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.layer, self.mask = layer, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.where(self.mask, self.layer.weight, 0.0)
        return torch.func.functional_call(self.layer, {"weight": weight}, (x,), strict=False)


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(grad.to(y.dtype))


def time_layers(kind: str, shape: tuple, autocast: bool, min_seconds: float,
                min_rounds: int) -> dict[str, list[float]]:
    """Seconds of one forward + backward per variant, call by call, timed round-robin."""
    layers, x = layer_variants(kind, shape)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        grad = torch.randn_like(layers["plain"](x))
    # warm-up inside: oneDNN picks and caches its kernels on the first calls
    return _round_robin({v: functools.partial(forward_backward, layers[v], x, grad, autocast) for v in VARIANTS},
                        min_seconds, min_rounds, pairs=(("masked", "plain"), ("masked", "hooked")))


def layer_table(quick: bool) -> list[dict]:
    rows = []
    cases = [("conv", s, False) for s in VGG_CONVS + RESNET_CONVS] + [("conv", s, True) for s in VGG_CONVS]
    cases += [("linear", s, False) for s in LINEARS]
    if quick:
        cases = cases[:2] + cases[-2:]
    for kind, shape, autocast in cases:
        # 40 rounds at least (the ratios' 95 % intervals then span about 1 % on this machine's noise), more where
        # they span over 3 %
        t = time_layers(kind, shape, autocast, *((0.05, 5) if quick else (1.0, 40)))
        rows.append({"layer": shape[0], "precision": "bf16 autocast" if autocast else "fp32", **{
            f"{v}_ms": round(statistics.median(t[v]) * 1e3, 3) for v in VARIANTS},
            "masked/plain": paired(t, "masked", "plain"), "masked/hooked": paired(t, "masked", "hooked"),
            "where/masked": paired(t, "masked-where", "masked")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- 2. the loop -------------------------------------------------------------------------------------------------

def loop_epochs(masked: bool, make_run, out: Path) -> list[float]:
    """Training seconds of every epoch of one run, with the masked layers or with the plain ones."""
    import dsd2.run.loop as loop_module

    swap = loop_module.swap_in_masked_layers
    if not masked:
        loop_module.swap_in_masked_layers = lambda model, **kwargs: (model, {})
    try:
        make_run(out)
    finally:
        loop_module.swap_in_masked_layers = swap
    from dsd2.runs import read_jsonl

    return [r["train_time_s"] for r in read_jsonl(out / "epochs.jsonl")]


def digits_run(epochs: int):
    from dsd2.config import build_config
    from dsd2.run import LevelLoop
    from dsd2.runs import RunDir

    cfg = build_config(None, None, {"optim": {"epochs": epochs, "dense_epochs": epochs}, "prune": {"levels": 1},
                                    "distill": {"students": ()}})
    return lambda out: LevelLoop(cfg, RunDir(out), progress=False, log=lambda s: None).run()


def vgg_run(epochs: int, images: int):
    import dsd2
    from dsd2.models import VGGLike

    g = torch.Generator().manual_seed(0)

    def data(n):
        return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (n,), generator=g))

    train, test = data(images), data(256)

    def run(out):
        torch.manual_seed(0)
        dsd2.prune(VGGLike(5, 5), train, test, out=out, log=lambda s: None,
                   config={"optim": {"epochs": epochs, "dense_epochs": epochs, "batch_size": BATCH},
                           "prune": {"levels": 1}})
    return run


def loop_table(quick: bool) -> list[dict]:
    """Epoch times of whole runs, plain and masked, in the order A B B A A B B A (drift in the machine's speed
    between runs then hits both alike); the spread of the runs' own medians is reported with the ratio."""
    rows = []
    runs = {"digits MLP": digits_run(3 if quick else 15), "VGG-like d5g5": vgg_run(1 if quick else 2,
                                                                                   256 if quick else 1024)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make_run in runs.items():
            epochs: dict[bool, list[float]] = {False: [], True: []}
            runs_median: dict[bool, list[float]] = {False: [], True: []}
            for i in range(1 if quick else 4):
                for masked in ((False, True) if i % 2 == 0 else (True, False)):
                    times = loop_epochs(masked, make_run, Path(tmp) / f"{name}-{masked}-{i}")[1:]
                    epochs[masked] += times
                    runs_median[masked].append(statistics.median(times))
            plain, ours = statistics.median(epochs[False]), statistics.median(epochs[True])
            rows.append({"run": name, "epochs_each": len(epochs[True]), "plain_epoch_s": round(plain, 4),
                         "masked_epoch_s": round(ours, 4), "masked/plain": round(ours / plain, 3),
                         "run_medians_s": {k: [round(v, 4) for v in vs] for k, vs in
                                           (("plain", runs_median[False]), ("masked", runs_median[True]))}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def training_steps(quick: bool) -> list[dict]:
    """One training step of the whole model (forward, backward, the masked SGD step; the VGG-like in bf16
    autocast and channels_last where the loop runs it so), plain layers against masked ones, round-robin in one
    process: the loop's epoch without its data and evaluation noise."""
    from dsd2.config import ModelConfig
    from dsd2.models import build_model
    from dsd2.ops import MaskedSGD, swap_in_masked_layers
    from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
    from dsd2.training.precision import native_bf16

    rows = []
    for name, cfg, shape in (("digits MLP", ModelConfig(name="mlp"), (1, 8, 8)),
                             ("VGG-like d5g5", ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32))):
        conv = cfg.name == "vgg"
        autocast = conv and native_bf16("cpu")
        torch.manual_seed(0)
        plain = build_model(cfg, shape, 10)
        if conv:
            plain = plain.to(memory_format=torch.channels_last)
        masks = global_prune(magnitude_scores(plain), full_masks(plain), 0.8)
        with torch.no_grad():
            for k, w in prunable_weights(plain).items():
                w.mul_(masks[k])
        masked, layers = swap_in_masked_layers(copy.deepcopy(plain), same_as=(Conv2d,))
        for k, layer in layers.items():
            layer.mask.copy_(masks[k])
        x = torch.randn(BATCH, *shape)
        x = x.contiguous(memory_format=torch.channels_last) if conv else x
        y = torch.randint(0, 10, (BATCH,))
        steps = {}
        for label, model in (("plain", plain), ("masked", masked)):
            weights = prunable_weights(model)
            opt = MaskedSGD(model.parameters(), {weights[k]: m for k, m in masks.items()}, lr=0.01)
            steps[label] = functools.partial(_train_step, model, opt, x, y, autocast)
        t = _round_robin(steps, 0.05 if quick else (2.0 if conv else 0.5), 5 if quick else 40,
                         pairs=(("masked", "plain"),))
        rows.append({"model": name, "precision": "bf16 autocast" if autocast else "fp32", "batch": BATCH,
                     "plain_ms": round(statistics.median(t["plain"]) * 1e3, 3),
                     "masked_ms": round(statistics.median(t["masked"]) * 1e3, 3),
                     "masked/plain": paired(t, "masked", "plain")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _train_step(model, opt, x, y, autocast: bool) -> None:
    opt.zero_grad(set_to_none=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _round_robin(fns: dict, min_seconds: float, min_rounds: int = 5, pairs: tuple = (),
                 width: float = 0.03, patience: float = 3.0) -> dict[str, list[float]]:
    """Seconds of each call of each function, called in turn (one round calls each once) until each has had
    min_seconds and min_rounds calls; list i of every function is from round i. Each round starts one variant later
    than the round before, so no variant always follows the same one (what the one before leaves in the caches and
    the allocator would otherwise favour or handicap it every time). Then, while the 95 % interval of a ratio in
    `pairs` (a over b, as `paired`) is wider than `width`, further rounds, up to `patience` times the time that
    minimum took: a layer whose calls scatter widely gets the rounds its ratio needs. When to stop looks at the
    intervals' width only, never at where the ratios lie."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())

    def run_round(i: int) -> None:
        first = i % len(order)
        for k, fn in order[first:] + order[:first]:
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)

    def wide() -> bool:
        return any((ci := paired(times, a, b)["ci95"]) is None or ci[1] - ci[0] > width for a, b in pairs)

    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds * len(fns) or rounds < min_rounds:
        run_round(rounds)
        rounds += 1
    deadline = start + (1.0 + patience) * (time.perf_counter() - start)
    while time.perf_counter() < deadline and wide():
        for _ in range(10):
            run_round(rounds)
            rounds += 1
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> dict:
    """a's time over b's: the median over rounds of the two calls' ratio within one round, and its distribution-free
    95 % interval (`median_ci`; none below 6 rounds). The calls of a round are microseconds to milliseconds apart,
    so a drift in this machine's speed (a neighbour, a frequency change) hits both sides of each ratio alike, where
    it would move the two medians apart."""
    out = median_ci([x / y for x, y in zip(times[a], times[b])])
    return {"ratio": round(out["median"], 3), "ci95": out["ci95"] and [round(v, 3) for v in out["ci95"]],
            "rounds": out["n"]}


def ratio_text(r: dict) -> str:
    """'1.004 [0.998, 1.010]', the ratio alone where there is no interval."""
    return f"{r['ratio']:.3f}" + (f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else "")


# ---- 3. GPU on paper ---------------------------------------------------------------------------------------------

PTX_LOAD = re.compile(r"\b(?:ld\.global[\w.]*?\.(v[24]\.)?[bfsu](8|16|32|64)|"
                      r"cp\.async\.\w+\.shared\.global\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+))")


def loop_load_bytes(ptx: str) -> int:
    """Bytes one thread loads from global memory per iteration of the kernel's main loop (the span between a
    label and the backward branch to it holding the most loads), from the PTX: ld.global by width, cp.async by
    size."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    best = 0
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            total = 0
            for body in lines[labels[m.group(1)]:i]:
                for vec, bits, size in PTX_LOAD.findall(body):
                    total += int(size, 0) if size else int(bits) // 8 * (int(vec[1]) if vec else 1)
            best = max(best, total)
    return best


def kernel_loads(launch, steps: int, tile_bytes: int) -> dict[str, int]:
    """One kernel's loads: per program and loop step from its sm_90 PTX, the same from its tile sizes (each operand
    tile, W and M included, once), and per call (programs x steps x the PTX's step bytes)."""
    import triton
    from dsd2.kernels.aot import TARGETS, jit_source

    src, options, _ = jit_source(launch, TARGETS["sm_90"])
    compiled = triton.compile(src, target=TARGETS["sm_90"], options=options)
    step = loop_load_bytes(compiled.asm["ptx"]) * 32 * compiled.metadata.num_warps
    programs = 1
    for g in launch.grid:
        programs *= g
    return {"ptx_step": step, "tile_step": tile_bytes, "call": step * programs * steps}


def tile_bytes(launch, a_size: int, b_size: int, mask_on_b: bool) -> int:
    c = launch.constexprs
    return c["BLOCK_K"] * (c["BLOCK_M"] * a_size + c["BLOCK_N"] * (b_size + (1 if mask_on_b else 0)))


def conv_estimate(shape: tuple) -> dict:
    """A conv layer in bf16, channels_last (the loop's GPU precision and layout for conv nets), batch 128."""
    from dsd2.kernels.masked_conv2d import plan_conv_forward, plan_conv_input_grad, plan_conv_weight_grad

    name, cin, cout, k, stride, size, _ = shape
    meta, fmt, e = torch.device("meta"), torch.channels_last, 2
    out = (size + 2 * (k // 2) - k) // stride + 1
    x = torch.empty(BATCH, cin, size, size, dtype=torch.bfloat16, device=meta).contiguous(memory_format=fmt)
    w = torch.empty(cout, cin, k, k, dtype=torch.bfloat16, device=meta).contiguous(memory_format=fmt)
    m = torch.empty(w.shape, dtype=torch.bool, device=meta).contiguous(memory_format=fmt)
    y = torch.empty(BATCH, cout, out, out, dtype=torch.bfloat16, device=meta).contiguous(memory_format=fmt)
    geo = ((stride, stride), (k // 2, k // 2), (1, 1), 1)
    fwd = plan_conv_forward(x, w, m, None, y, *geo, "tf32")
    dgrad = plan_conv_input_grad(y, w, m, torch.empty_like(x), *geo, "tf32")
    wgrad, partial = plan_conv_weight_grad(y, x, m, w.shape, *geo, "tf32")
    span = wgrad.args[wgrad.kernel.arg_names.index("span")]
    loads = [kernel_loads(fwd, -(-cin * k * k // fwd.constexprs["BLOCK_K"]), tile_bytes(fwd, e, e, True)),
             kernel_loads(dgrad, -(-cout * k * k // dgrad.constexprs["BLOCK_K"]), tile_bytes(dgrad, e, e, True)),
             kernel_loads(wgrad, span // wgrad.constexprs["BLOCK_K"], tile_bytes(wgrad, e, e, False))]
    n, xs, ys, splits = w.numel(), x.numel(), y.numel(), partial.shape[0]
    products = (xs + ys) * e * 3 + n * e * 2  # the three products' activations and weight reads, once each
    casts = 2 * 6 * n  # autocast's fp32 -> bf16 weight copy and the fp32 gradient back (read 4 + write 2 each)
    ours = products + casts + 3 * n + n * e  # M read by each kernel, dW written once
    hooked = products + casts + n * e + 2 * 12 * n  # cuDNN's dW; W_orig*M and dW*M: read 4 + 4 (mask), write 4
    # the weight gradient's split partials (fp32, written then summed) stay in an H100/H200's 50 MB L2 when small
    return {"layer": name, "loads": loads, "wgrad_splits": splits, "wgrad_partials_MB": round(splits * n * 8 / 1e6, 2),
            "dram_ours_MB": round(ours / 1e6, 2), "dram_hooked_MB": round(hooked / 1e6, 2),
            "w_x_mask_tensor_MB": {"ours": 0, "hooked": n * 4 / 1e6}}


def linear_estimate(shape: tuple) -> dict:
    """A linear layer in fp32 (IEEE, torch's default for matrix products on CUDA), batch 128."""
    from dsd2.kernels.masked_linear import plan_matmul

    name, cin, cout = shape
    meta = torch.device("meta")
    x, w, y = (torch.empty(s, device=meta) for s in ((BATCH, cin), (cout, cin), (BATCH, cout)))
    m = torch.empty(cout, cin, dtype=torch.bool, device=meta)
    fwd = plan_matmul(x, w.t(), y, m.t(), mask_b=True, bias=torch.empty(cout, device=meta), precision="ieee")
    dx = plan_matmul(y, w, torch.empty_like(x), m, mask_b=True, precision="ieee")
    dw = plan_matmul(y.t(), x, torch.empty_like(w), m, mask_c=True, precision="ieee")
    loads = [kernel_loads(launch, -(-red // launch.constexprs["BLOCK_K"]), tile_bytes(launch, 4, 4, masked))
             for launch, red, masked in ((fwd, cin, True), (dx, cout, True), (dw, BATCH, False))]
    n, xs, ys = w.numel(), x.numel(), y.numel()
    products = (xs + ys) * 4 * 3 + n * 4 * 3  # activations of the three products; W twice, dW written once
    ours = products + 3 * n  # the mask read by each product
    hooked = products + 2 * 12 * n  # W_orig*M and dW*M (float mask): read 4 + 4, write 4
    return {"layer": name, "loads": loads, "dram_ours_MB": round(ours / 1e6, 3),
            "dram_hooked_MB": round(hooked / 1e6, 3), "w_x_mask_tensor_MB": {"ours": 0, "hooked": n * 4 / 1e6}}


def gpu_estimate(quick: bool) -> list[dict]:
    convs = (VGG_CONVS[1:3] + RESNET_CONVS[1:2]) if quick else VGG_CONVS + RESNET_CONVS
    rows = [conv_estimate(s) for s in convs] + [linear_estimate(s) for s in (LINEARS[:2] if quick else LINEARS)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(out: dict) -> str:
    """The run as markdown tables (the README's)."""
    m = out["machine"]
    lines = [f"{m['cpu']}, ISA level {m['cpu_isa']}, {m['threads']} threads, torch {m['torch']}, load average "
             f"{m['load_at_start']} at the start, {m.get('load_at_end', '?')} at the end", "",
             "| layer, batch 128 | precision | plain ms | hooked ms | masked ms | masked / plain | masked / hooked "
             "| torch.where copy / C++ |", "|---|---|---|---|---|---|---|---|"]
    for r in out["layers"]:
        lines.append(f"| {r['layer']} | {r['precision']} | {r['plain_ms']:.2f} | {r['hooked_ms']:.2f} | "
                     f"{r['masked_ms']:.2f} | {ratio_text(r['masked/plain'])} | {ratio_text(r['masked/hooked'])} | "
                     f"{ratio_text(r['where/masked'])} |")
    lines += ["", "| training step (fwd, bwd, masked SGD), batch 128, 80 % pruned | precision | plain ms | masked ms "
              "| masked / plain |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['precision']} | {r['plain_ms']:.2f} | {r['masked_ms']:.2f} | "
              f"{ratio_text(r['masked/plain'])} |" for r in out["steps"]]
    if "loop" in out:
        lines += ["", "| loop run (A B B A A B B A) | epochs timed each | plain s / epoch | masked s / epoch | "
                  "masked / plain | medians of the runs, plain; masked |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['epochs_each']} | {r['plain_epoch_s']:.4f} | {r['masked_epoch_s']:.4f} | "
                  f"{r['masked/plain']:.3f} | {', '.join(map(str, r['run_medians_s']['plain']))}; "
                  f"{', '.join(map(str, r['run_medians_s']['masked']))} |" for r in out["loop"]]
    if "gpu_estimate" in out:
        lines += ["", "| layer (estimate, sm_90 PTX) | loads per tile step, PTX = tiles (fwd, dX, dW) | "
                  "L2 loads MB | DRAM MB ours | DRAM MB hooked | W⊙M tensor MB hooked (ours 0) |",
                  "|---|---|---|---|---|---|"]
        for r in out["gpu_estimate"]:
            steps = ", ".join(f"{x['ptx_step']}{' = ' if x['ptx_step'] == x['tile_step'] else ' != '}"
                              f"{x['tile_step']}" for x in r["loads"])
            l2 = sum(x["call"] for x in r["loads"]) / 1e6
            lines.append(f"| {r['layer']} | {steps} | {l2:.1f} | {r['dram_ours_MB']} | {r['dram_hooked_MB']} | "
                         f"{r['w_x_mask_tensor_MB']['hooked']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes, short timings (a smoke run)")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--no-loop", action="store_true", help="skip the loop's epoch times")
    parser.add_argument("--no-gpu-estimate", action="store_true", help="skip the PTX estimate")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    load = os.getloadavg()[0]
    machine = {"cpu": cpu_model(), "cpu_isa": cpu_isa(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "load_at_start": round(load, 2)}
    print(json.dumps(machine), flush=True)
    out = {"machine": machine, "layers": layer_table(args.quick), "steps": training_steps(args.quick)}
    from dsd2.ops import cpp_extension

    if cpp_extension() is not None:  # which backward products auto split by rows per thread (measured per shape)
        out["linear_split"] = [dict(zip(("product", "rows", "cols", "depth", "threads", "split"), c))
                               for c in cpp_extension().linear_split_choices()]
        print(json.dumps({"linear_split": out["linear_split"]}), flush=True)
    if not args.no_loop:
        out["loop"] = loop_table(args.quick)
    if not args.no_gpu_estimate:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("the GPU estimate compiles the kernels: unset TRITON_INTERPRET", file=sys.stderr)
            return 2
        out["gpu_estimate"] = gpu_estimate(args.quick)
    out["machine"]["load_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
