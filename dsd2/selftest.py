"""`dsd2-engine selftest`: the first command on a new machine, and what to attach to a bug report.

Each fused op runs on the device for several shapes and dtypes and is compared with its plain-PyTorch reference
(on the CPU: at every instruction-set level this CPU runs); CUDA graphs (training step, evaluation, counting)
are compared with eager steps; a two-level digits run is made twice and its metrics compared (CUDA: graphs on
against off; CPU: every level against `default`); each op and the training step are timed against eager code
on the same device. The result is one table (check, result, time, speed-up), optionally JSON.

Results: "pass"; "FAIL" (a mismatch: the exit code is 1); "slow" (a timing check whose fused code takes more than
SLOW_FACTOR times the eager code it replaces, best of REPEATS interleaved blocks each: the exit code is 1 with
`--strict`); "not compared" (it ran, but there was nothing to compare it with: the eager training step where no
graph path exists, a two-level run on a CPU with one instruction-set level); "skipped" (it could not run here).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsd2.ops import (
    MaskedSGD,
    count_positive_,
    count_positive_reference,
    cpu_isa_levels,
    cpu_model,
    kd_loss,
    kd_loss_eager,
    kd_loss_reference,
    masked_sgd_reference,
    relu_count,
    use_cpu_isa,
)
from dsd2.ops.kd_loss import kd_tolerances

# the documented tolerance between a graphed and an eager run (or two CPU levels with distillation)
RUN_RTOL = 1e-4
# a timing check is "slow" when ours takes more than SLOW_FACTOR x the eager time: the margin above 1 keeps the
# best-of-REPEATS timings of a loaded machine from calling an op slow that is as fast as eager
SLOW_FACTOR = 1.25
REPEATS = 5
# CPU timings run on one thread: with every core in use, another job on the machine stalls each parallel region
# until its preempted thread runs again, and the ratio then measures the scheduler (on a loaded 2-core machine, from
# 3x to 40x for the same op) rather than the two codes
CPU_TIMING_THREADS = 1
RESULTS = ("pass", "FAIL", "slow", "not compared", "skipped")


@dataclass
class Check:
    name: str
    result: str  # one of RESULTS
    detail: str = ""
    time_s: float | None = None
    speedup: float | None = None  # timing checks with a baseline: eager time / our time
    baseline_s: float | None = None  # the eager time
    min_speedup: float | None = None  # the threshold: a speed-up below it is "slow"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def best_times(fns: list[Callable[[], None]], seconds: float, sync: Callable[[], None]) -> list[float]:
    """Seconds per call of each of `fns`: the best of REPEATS blocks of calls (about `seconds` per fn in all, a
    warm-up block included). The fns' blocks alternate, so that a load which comes and goes during the measurement
    slows each of them alike."""
    block, calls = seconds / (REPEATS + 1), []
    for fn in fns:  # the warm-up block (lazy buffers, first-call dispatch, the allocator's first pages) sizes the rest
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < block:
            fn()
            sync()
            n += 1
        calls.append(max(1, round(n * block / (time.perf_counter() - t0))))
    best = [math.inf] * len(fns)
    for _ in range(REPEATS):
        for i, (fn, n) in enumerate(zip(fns, calls)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return best


def speed_check(name: str, t_ours: float, t_eager: float, what: str, device: torch.device) -> Check:
    """A timing check against the eager code that ours replaces: "slow" past SLOW_FACTOR x its time."""
    speedup, floor = t_eager / t_ours, 1 / SLOW_FACTOR
    how = f"best of {REPEATS}" + (f", {CPU_TIMING_THREADS} CPU thread" if device.type == "cpu" else "")
    return Check(name, "slow" if speedup < floor else "pass",
                 f"against {what}: {t_eager * 1e6:.0f} µs; slow below {floor:.2f}x ({how})",
                 t_ours, speedup, t_eager, floor)


@contextlib.contextmanager
def timing_threads(device: torch.device):
    """CPU_TIMING_THREADS for the ops inside (on a CPU; a CUDA device is left as it is)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(CPU_TIMING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eager_count_hook(x: torch.Tensor, freq: torch.Tensor) -> None:
    """What `count_positive_` replaces: the usual entropy hook, a float copy of the on-states per batch."""
    freq.add_((x > 0).float().mean(0))


def eager_relu_and_hook(x: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """What `relu_count` replaces: a ReLU and the usual hook on its output."""
    y = torch.relu(x)
    eager_count_hook(y, freq)
    return y


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---- ops against their references -------------------------------------------------------------------------

def kd_checks(device: torch.device, sizes: list[tuple[int, int]], dtypes, tag: str) -> list[Check]:
    out = []
    for (b, c), dtype in ((s, d) for s in sizes for d in dtypes):
        g = torch.Generator().manual_seed(b * 1000 + c)
        s, t = (torch.randn(b, c, generator=g) * 3).to(dtype), (torch.randn(b, c, generator=g) * 3).to(dtype)
        y = torch.randint(0, c, (b,), generator=g)
        a = s.clone().to(device).requires_grad_()
        loss = kd_loss(a, t.to(device), y.to(device))
        loss.backward()
        r = s.double().requires_grad_()
        ref = kd_loss_reference(r, t.double(), y)[0]
        ref.backward()
        ltol, gtol = kd_tolerances(dtype, c)
        lerr = abs(float(loss.detach()) - float(ref.detach())) / max(abs(float(ref.detach())), 1.0)
        gerr = float((a.grad.double().cpu() - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-12))
        ok = lerr <= ltol and gerr <= gtol and a.grad.dtype == dtype
        out.append(Check(f"kd_loss {str(dtype)[6:]} B={b} C={c}{tag}", _verdict(ok),
                         f"loss err {lerr:.1e} (tol {ltol:.1e}), grad err {gerr:.1e} (tol {gtol:.1e})"))
    return out


def counting_checks(device: torch.device, shapes, dtypes, tag: str) -> list[Check]:
    out = []
    for shape, dtype in ((s, d) for s in shapes for d in dtypes):
        g = torch.Generator().manual_seed(len(shape) * 7 + shape[-1])
        x = torch.randn(shape, generator=g)
        x[x.abs() < 0.3] = 0.0  # exact zeros tell > 0 from >= 0
        x = x.to(dtype)
        for per_channel, inclusive in ((False, False), (True, False), (False, True)):
            n = shape[1] if per_channel else x[0].numel()
            want = count_positive_reference(x, torch.zeros(n, dtype=torch.long), inclusive, per_channel)
            got = torch.zeros(n, dtype=torch.long, device=device)
            count_positive_(x.to(device), got, inclusive=inclusive, per_channel=per_channel)
            fused = torch.zeros(n, dtype=torch.long, device=device)
            y = relu_count(x.to(device), fused, inclusive=inclusive, per_channel=per_channel)
            ok = torch.equal(got.cpu(), want) and torch.equal(fused.cpu(), want) and torch.equal(y.cpu(), x.relu())
            mode = ("channel" if per_channel else "element") + (", >= 0" if inclusive else "")
            out.append(Check(f"count + relu_count {str(dtype)[6:]} {tuple(shape)} {mode}{tag}", _verdict(ok),
                             "exact" if ok else "counts or ReLU output differ from the reference"))
    return out


def sgd_checks(device: torch.device, tag: str) -> list[Check]:
    out = []
    for momentum, nesterov in ((0.9, False), (0.9, True), (0.0, False)):
        g = torch.Generator().manual_seed(5)
        shapes = ((33, 17), (8, 3, 3, 3), (7,))
        params = [torch.randn(s, generator=g) for s in shapes]
        masks = [torch.rand(s, generator=g) < 0.4 for s in shapes[:-1]] + [None]
        for p, m in zip(params, masks):
            if m is not None:
                p.mul_(m)
        ours = [p.to(device).requires_grad_() for p in params]
        ref = [p.clone() for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        opt = MaskedSGD(ours, {p: m.to(device) for p, m in zip(ours, masks) if m is not None}, lr=0.05,
                        momentum=momentum, weight_decay=1e-4, nesterov=nesterov)
        for step in range(10):
            grads = [torch.randn(p.shape, generator=g) for p in params]
            for p, gr in zip(ours, grads):
                p.grad = gr.to(device)
            opt.step()
            masked_sgd_reference(ref, grads, bufs if momentum else [None] * len(ref), masks, lr=0.05,
                                 momentum=momentum, weight_decay=1e-4, nesterov=nesterov, first=step == 0)
        got = [p.detach().cpu() for p in ours]
        if device.type == "cpu":  # one formula, no fused multiply-adds: identical bits
            ok, detail = all(torch.equal(a, b) for a, b in zip(got, ref)), "bit for bit"
        else:
            err = max(float((a - b).abs().max()) for a, b in zip(got, ref))
            ok, detail = err <= 1e-6, f"max error {err:.1e} (tol 1e-6)"
        pruned_zero = all(bool((a[~m] == 0).all()) for a, m in zip(got, masks) if m is not None)
        name = f"masked SGD momentum={momentum}{' nesterov' if nesterov else ''}{tag}"
        out.append(Check(name, _verdict(ok and pruned_zero), detail + ("" if pruned_zero else "; pruned weight moved")))
    return out


def sparse_checks(device: torch.device, tag: str) -> list[Check]:
    """The masked layers' sparse path (forward, dX, dW) against float64 on W⊙M, elementwise within the product
    tolerance of the dense path: the C++ kernels on the CPU, the torch.sparse CSR products (cuSPARSE) on CUDA."""
    from dsd2.ops import SparsePlan, sparse_conv2d, sparse_linear
    from dsd2.ops.masked_linear import product_tolerance
    from dsd2.ops.sparse_csr import csr_conv2d, csr_linear

    if device.type not in ("cpu", "cuda"):
        return [Check(f"sparse layers{tag}", "skipped", f"no sparse path on {device.type}")]
    linear, conv = (sparse_linear, sparse_conv2d) if device.type == "cpu" else (csr_linear, csr_conv2d)
    out = []
    cases = [("conv 3x3 s1", (4, 6, 9, 9), (8, 6, 3, 3), 1, 1), ("conv 3x3 s2", (3, 5, 8, 8), (4, 5, 3, 3), 2, 1),
             ("linear", (7, 33), (19, 33), None, None)]
    for name, x_shape, w_shape, stride, pad in cases:
        for density in (0.02, 0.3):
            g = torch.Generator().manual_seed(3)
            x = torch.randn(x_shape, generator=g).to(device).requires_grad_()
            w = torch.randn(w_shape, generator=g).to(device).requires_grad_()
            mask = (torch.rand(w_shape, generator=g) < density).to(device)
            plan = SparsePlan(mask)
            if stride is None:
                y = linear(x, w, plan)
                ref = lambda a, b: F.linear(a, b)  # noqa: E731
                k = w_shape[1]
            else:
                y = conv(x, w, plan, None, (stride, stride), (pad, pad))
                ref = lambda a, b, s=stride, p=pad: F.conv2d(a, b, None, s, p)  # noqa: E731
                k = w_shape[1] * w_shape[2] * w_shape[3]
            grad = torch.randn(y.shape, generator=g).to(device)
            y.backward(grad)
            wm = torch.where(mask, w.detach(), 0.0).double()
            x64 = x.detach().double().requires_grad_()
            w64 = wm.clone().requires_grad_()
            y64 = ref(x64, w64)
            y64.backward(grad.double())
            terms = ref(x.detach().double().abs(), wm.abs())
            ok = bool(((y.detach().double() - y64).abs() <= product_tolerance(torch.float32, k) * terms + 1e-30).all())
            err_dx = float((x.grad.double() - x64.grad).abs().max())
            err_dw = float((w.grad.double() - torch.where(mask, w64.grad, 0.0)).abs().max())
            scale = float(x64.grad.abs().max() + w64.grad.abs().max()) + 1e-12
            ok = ok and max(err_dx, err_dw) <= 1e-4 * scale and bool((w.grad[~mask] == 0).all())
            out.append(Check(f"sparse {name} {density:.0%} kept{tag}", _verdict(ok),
                             f"dX/dW max error {max(err_dx, err_dw):.1e} (scale {scale:.1e})"))
    return out


def op_checks(device: torch.device, quick: bool) -> list[Check]:
    kd_sizes = [(37, 10), (129, 100), (5, 4097)] if quick else [(37, 10), (1031, 100), (17, 1000), (3, 32768)]
    shapes = [(5, 3, 7, 7), (9, 1030)] if quick else [(5, 3, 7, 7), (9, 1030), (6, 16, 32, 32), (3, 8200)]
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16)
    out = []
    # without dsd2._C there are no levels: the ops' PyTorch paths are still checked, once
    for level in (cpu_isa_levels() or [""]) if device.type == "cpu" else [""]:
        tag = f" [{level}]" if level else ""
        with use_cpu_isa(level) if level else contextlib.nullcontext():
            out += kd_checks(device, kd_sizes, dtypes, tag)
            out += counting_checks(device, shapes, dtypes, tag)
            out += sgd_checks(device, tag)
            out += sparse_checks(device, tag)
    return out


# ---- CUDA graphs ------------------------------------------------------------------------------------------

def _small_vgg(device: torch.device, seed: int = 0):
    from dsd2.config import ModelConfig, OptimConfig
    from dsd2.data import DeviceDataset
    from dsd2.models import build_model
    from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
    from dsd2.training import build_optimizer

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="vgg", depth=2, width=3), (3, 32, 32), 10).to(device)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.5)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64 * 6 + 5, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (images.shape[0],), generator=g).to(device)
    opt = build_optimizer(model, masks, OptimConfig(optimizer="sgd", lr=0.01, batch_size=64))
    stats = torch.full((3,), 120.0, device=device), torch.full((3,), 70.0, device=device)
    return model, opt, DeviceDataset(images, labels), *stats


def graph_checks(device: torch.device, graphs=None) -> list[Check]:
    """`graphs`: the graph maker (default: CUDA graphs on a CUDA device; the tests pass their CPU emulator)."""
    names = ("graphed training step = eager steps", "captured evaluation = eager predict",
             "captured counting pass = eager counts")
    if device.type != "cuda" and graphs is None:
        return [Check(n, "skipped", "CUDA graphs need a CUDA device") for n in names]
    sync = _sync(device)
    from dsd2.ops import swap_in_counting_relus
    from dsd2.training import InputFormat, TrainFeed, cross_entropy, predict
    from dsd2.training.graphs import GraphedPredictor, GraphedTrainStep, graphed_epoch

    out = []
    model, opt, data, mean, std = _small_vgg(device)
    gmodel, gopt, _, _, _ = _small_vgg(device)
    perm = torch.randperm(data.labels.numel(), generator=torch.Generator().manual_seed(3)).to(device)
    model.train()
    for start in range(0, perm.numel(), 64):
        idx = perm[start:start + 64]
        x = (data.images[idx].float() - mean[:, None, None]) / std[:, None, None]
        F.cross_entropy(model(x), data.labels[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def make(warm, lr):
        return GraphedTrainStep(gmodel, gopt, cross_entropy, TrainFeed(data, 64, InputFormat(mean, std)),
                                warmup_indices=warm, lr=lr, graphs=graphs)

    t0 = time.perf_counter()
    graphed_epoch(None, make, perm, 64, 0.01)
    sync()
    err = max(float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)).max())
              for a, b in zip(gmodel.state_dict().values(), model.state_dict().values()))
    out.append(Check(names[0], _verdict(err <= RUN_RTOL), f"max relative difference {err:.1e} (tol {RUN_RTOL})",
                     time.perf_counter() - t0))
    eager_logits = predict(model, data, 64, InputFormat(mean, std))
    graphed = GraphedPredictor(model, 64, InputFormat(mean, std), graphs=graphs).predict(data)
    err = float((graphed - eager_logits).abs().max() / eager_logits.abs().max())
    out.append(Check(names[1], _verdict(err <= RUN_RTOL), f"max relative difference {err:.1e} (tol {RUN_RTOL})"))
    relus = swap_in_counting_relus(model)
    for r in relus.values():
        r.counting = True
    predict(model, data, 64, InputFormat(mean, std))
    eager_counts = {n: r.counts.clone() for n, r in relus.items()}
    for r in relus.values():
        r.reset_counts()
    GraphedPredictor(model, 64, InputFormat(mean, std), relus=relus, graphs=graphs).predict(data)
    ok = all(torch.equal(relus[n].counts, c) for n, c in eager_counts.items())
    out.append(Check(names[2], _verdict(ok), "exact" if ok else "counts differ"))
    return out


# ---- a two-level digits run ---------------------------------------------------------------------------------

def digits_run(root: Path, **overrides) -> list[dict]:
    """A two-level digits run with SGD into `root`; its metrics rows without the timing fields."""
    from dsd2.config import build_config
    from dsd2.run import LevelLoop
    from dsd2.runs import VOLATILE_METRICS, RunDir, read_jsonl

    cfg = build_config(None, None, {"optim": {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "dense_epochs": 2},
                                    "prune": {"levels": 2}, **overrides})
    LevelLoop(cfg, RunDir(root), progress=False, log=lambda s: None).run()
    return [{k: v for k, v in r.items() if k not in VOLATILE_METRICS} for r in read_jsonl(root / "metrics.jsonl")]


def _max_rel_diff(a, b) -> float:
    """Largest relative difference between two metric structures (rows, lists, numbers); inf where they differ
    in anything that is not a number (a key, a level, a phase name)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((_max_rel_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((_max_rel_diff(x, y) for x, y in zip(a, b)), default=0.0)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return 0.0
        return abs(a - b) / max(abs(b), 1e-6)
    return 0.0 if a == b else math.inf


def run_checks(device: torch.device) -> list[Check]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if device.type == "cuda":
            t0 = time.perf_counter()
            on = digits_run(tmp / "graphs", device=str(device), cuda_graphs=True)
            off = digits_run(tmp / "eager", device=str(device), cuda_graphs=False)
            diff = _max_rel_diff(on, off)  # (entropy lists are rounded to 6 digits: within the tolerance)
            return [Check("two-level digits run: graphs on = off", _verdict(diff <= RUN_RTOL),
                          f"largest relative metric difference {diff:.1e} (tol {RUN_RTOL})",
                          time.perf_counter() - t0)]
        levels = cpu_isa_levels()
        t0 = time.perf_counter()
        with use_cpu_isa(levels[0]) if levels else contextlib.nullcontext():
            base = digits_run(tmp / "base")
        t_base = time.perf_counter() - t0
        if len(levels) < 2:
            name, why = (f"two-level digits run [{levels[0]}]", "this CPU runs one instruction-set level only") \
                if levels else ("two-level digits run", "dsd2._C is not built: the C++ kernels have no levels")
            return [Check(name, "not compared", f"ran; {why}: no other level to compare it with", t_base)]
        first = levels[0]
        out = []
        for level in levels[1:]:
            t0 = time.perf_counter()
            with use_cpu_isa(level):
                rows = digits_run(tmp / level)
            same = rows == base  # SGD is bit-identical across levels and counts are exact
            out.append(Check(f"two-level digits run [{level}] = [{first}]", _verdict(same),
                             f"identical metrics (the [{first}] run: {t_base:.2f} s)" if same
                             else f"metrics differ from the [{first}] level", time.perf_counter() - t0))
        return out


# ---- timings ------------------------------------------------------------------------------------------------

def timing_checks(device: torch.device, quick: bool) -> list[Check]:
    with timing_threads(device):
        return _timing_checks(device, quick)


def _timing_checks(device: torch.device, quick: bool) -> list[Check]:
    seconds = 0.1 if quick else 0.5
    sync = _sync(device)
    out = []

    def compare(name: str, ours: Callable[[], None], eager: Callable[[], None], what: str) -> None:
        out.append(speed_check(name, *best_times([ours, eager], seconds, sync), what, device))

    g = torch.Generator().manual_seed(0)
    b = 1024 if quick else 8192
    s = torch.randn(b, 100, generator=g).to(device).requires_grad_()
    t = torch.randn(b, 100, generator=g).to(device)
    y = torch.randint(0, 100, (b,), generator=g).to(device)

    def kd_step(fn):
        def step():
            s.grad = None
            fn(s, t, y).backward()
        return step

    compare(f"time: kd_loss fwd+bwd B={b} C=100", kd_step(kd_loss), kd_step(kd_loss_eager),
            "eager PyTorch (kl_div)")
    x = torch.randn(32 if quick else 128, 64, 32, 32, generator=g).to(device)
    counts = torch.zeros(x[0].numel(), dtype=torch.long, device=device)
    freq = torch.zeros(x.shape[1:], device=device)
    compare(f"time: count states {tuple(x.shape)}", lambda: count_positive_(x, counts),
            lambda: eager_count_hook(x, freq), "the usual forward hook")
    compare(f"time: relu_count {tuple(x.shape)}", lambda: relu_count(x, counts), lambda: eager_relu_and_hook(x, freq),
            "a ReLU and the usual forward hook")
    model, opt, data, mean, std = _small_vgg(device)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    masked = [(p, opt.masks[id(p)]) for p in params if id(p) in getattr(opt, "masks", {})]

    def sgd_remask():
        sgd.step()
        with torch.no_grad():
            torch._foreach_mul_([p for p, _ in masked], [m for _, m in masked])

    compare("time: masked SGD step (VGG-like δ=2 γ=3)", opt.step, sgd_remask, "torch.optim.SGD + re-mask")
    out.append(train_step_timing(device, seconds))
    return out


def train_step_timing(device: torch.device, seconds: float, graphs=None) -> Check:
    """Graph replay against eager steps on a CUDA device; `graphs`: the graph maker (the tests pass their CPU
    emulator). Without graphs, the eager step's time alone, "not compared"."""
    from dsd2.training import InputFormat, TrainFeed, cross_entropy

    model, opt, data, mean, std = _small_vgg(device)
    idx = torch.arange(64, device=device)

    def eager():
        x = (data.images[idx].float() - mean[:, None, None]) / std[:, None, None]
        F.cross_entropy(model(x), data.labels[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    name = "time: training step (VGG-like δ=2 γ=3, batch 64)"
    sync = _sync(device)
    if device.type != "cuda" and graphs is None:
        with timing_threads(device):
            (t,) = best_times([eager], seconds, sync)
        return Check(name, "not compared", f"eager step only ({CPU_TIMING_THREADS} CPU thread): no CUDA graphs on "
                     "this device to compare it with", t)
    from dsd2.training.graphs import GraphedTrainStep

    gmodel, gopt, _, _, _ = _small_vgg(device)
    step = GraphedTrainStep(gmodel, gopt, cross_entropy, TrainFeed(data, 64, InputFormat(mean, std)),
                            warmup_indices=[idx] * 3, lr=0.01, graphs=graphs)
    with timing_threads(device):
        t_graph, t_eager = best_times([lambda: step.replay(idx, 0.01), eager], seconds, sync)
    return speed_check(name, t_graph, t_eager, "eager steps (graph replay timed)", device)


# ---- the command ------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cpu": cpu_model(), "cpu_isa_levels": cpu_isa_levels(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def run_selftest(device: torch.device, quick: bool = False) -> list[Check]:
    checks = []
    parts = {"ops against their references": lambda: op_checks(device, quick),
             "CUDA graphs against eager": lambda: graph_checks(device),
             "two-level digits run": lambda: run_checks(device),
             "timings": lambda: timing_checks(device, quick)}
    for name, part in parts.items():
        t0 = time.perf_counter()
        try:
            got = part()
        except Exception as exc:  # a crash is a failed check, reported with the rest
            got = [Check(name, "FAIL", f"{type(exc).__name__}: {exc}")]
        for c in got:
            if c.time_s is None and c.result != "skipped" and not c.name.startswith("time:"):
                c.time_s = (time.perf_counter() - t0) / max(len(got), 1)
        checks += got
    return checks


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'result':<12}  time       speed-up  detail"]
    for c in checks:
        t = "" if c.time_s is None else (f"{c.time_s * 1e3:.2f} ms" if c.time_s < 1 else f"{c.time_s:.2f} s")
        sp = "" if c.speedup is None else f"{c.speedup:.2f}x"
        lines.append(f"{c.name:<{width}}  {c.result:<12}  {t:<9}  {sp:<8}  {c.detail}")
    failed = sum(c.result == "FAIL" for c in checks)
    lines.append(f"{sum(c.result == 'pass' for c in checks)} passed, {failed} failed, "
                 f"{sum(c.result == 'slow' for c in checks)} slow, "
                 f"{sum(c.result == 'not compared' for c in checks)} not compared, "
                 f"{sum(c.result == 'skipped' for c in checks)} skipped")
    return "\n".join(lines)


def exit_code(checks: list[Check], strict: bool = False) -> int:
    """1 on any failed check; with `strict`, also on any slow one."""
    return int(any(c.result == "FAIL" or (strict and c.result == "slow") for c in checks))


def write_json(path: Path, device: torch.device, checks: list[Check]) -> None:
    path.write_text(json.dumps({"environment": environment(device), "checks": [asdict(c) for c in checks]},
                               indent=1))
