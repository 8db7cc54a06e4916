"""GPU benchmark of the engine's step: eager against CUDA graphs, fp32 against bf16, channels_last, for the
teacher (ResNet-18) and student (VGG-like d=5 g=5) presets on CIFAR-shaped data, 80 % sparse.

    python benchmarks/bench_gpu.py            # prints the tables and writes them into benchmarks/RESULTS.md

Training step at batch 128, through the engine's own executors (the eager epoch and the graph replays the level
loop runs, crop-and-flip augmentation on the device included): step time, images/s and achieved TFLOP/s
(training FLOPs = 3 x the dense forward, fvcore convention, 1 FLOP per multiply-add), and for graphs the one-off
warm-up + capture time that each level pays (a level builds a new optimizer, hence a new capture). Evaluation at
batch 512 (the engine's): eager `predict` against `GraphedPredictor`, with the ReLU-state counting off and on.
Then each Triton op (KD loss forward + backward, ReLU + counting, counting alone, the masked SGD step) against
the eager torch code it replaces, on the same inputs. Every variant is measured in the same run as the others.
Without a CUDA device it measures nothing and exits with status 2.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator

import torch
from results_file import write_block  # benchmarks/, on the path of a script run from it

from dsd2.analysis.flops import measure_forward_flops
from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.models import build_model
from dsd2.ops import MaskedSGD, count_positive_, kd_loss, kd_loss_eager, relu_count, swap_in_counting_relus
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import InputFormat, TrainFeed, build_optimizer, cross_entropy, predict
from dsd2.training.executor import EagerExecutor, GraphedExecutor
from dsd2.training.graphs import CudaGraphs, GraphedPredictor

BATCH, EPOCHS, EVAL_BATCH, EVAL_PASSES = 128, 2, 512, 5
MODELS = {"teacher ResNet-18": ModelConfig(name="resnet18"), "student VGG-like d5 g5": ModelConfig(name="vgg")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make(cfg: ModelConfig, channels_last: bool, device: torch.device):
    torch.manual_seed(0)
    model = build_model(cfg, (3, 32, 32), 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    opt = build_optimizer(model, masks, OptimConfig(optimizer="sgd", lr=0.01, weight_decay=1e-4))
    return model, opt


def bench(cfg: ModelConfig, graphs, precision: str, channels_last: bool, data: DeviceDataset,
          batch: int = BATCH, epochs: int = EPOCHS) -> tuple[float, float]:
    """(seconds per training step, seconds of warm-up + capture) of the engine's own epoch: the executor the level
    loop runs (eager, or graph replays when `graphs` is a graph maker), crop-and-flip augmentation on the device
    included, its once-per-epoch read of the loss and accuracy included. One untimed epoch first (the capture)."""
    dev = data.images.device
    model, opt = make(cfg, channels_last, dev)
    mean, std = torch.full((3,), 120.0, device=dev), torch.full((3,), 64.0, device=dev)
    feed = TrainFeed(data, batch, InputFormat(mean, std, precision, channels_last), augment=True)
    args = (model, feed, cross_entropy, {}, 0, 10)
    executor = EagerExecutor(*args) if graphs is None else GraphedExecutor(*args, graphs=graphs)
    first = executor.train_epoch(opt, 1, 0, 0.01)
    sync(dev)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        executor.train_epoch(opt, 1, epoch, 0.01)
    sync(dev)
    steps = epochs * -(-len(data) // batch)
    return (time.perf_counter() - t0) / steps, first.get("graph_capture_s", 0.0)


def bench_eval(cfg: ModelConfig, graphs, counting: bool, precision: str, channels_last: bool,
               data: DeviceDataset, batch: int = EVAL_BATCH, passes: int = EVAL_PASSES) -> float:
    """Seconds per evaluation pass over `data` (several passes after one untimed pass)."""
    dev = data.images.device
    model, _ = make(cfg, channels_last, dev)
    relus = swap_in_counting_relus(model)
    mean, std = torch.full((3,), 120.0, device=dev), torch.full((3,), 64.0, device=dev)
    if graphs is not None:
        predictor = GraphedPredictor(model, batch, InputFormat(mean, std, precision, channels_last), relus=relus,
                                     graphs=graphs)
        run = lambda: predictor.predict(data)
    else:
        run = lambda: predict(model, data, batch, InputFormat(mean, std, precision, channels_last))
    for r in relus.values():
        r.counting = counting
    return per_call(run, dev, passes)


# Each fused op against the plain torch code it replaces, on the same device and inputs: (B, C) of the KD loss,
# activation shape of the counting, model of the optimizer step
KD_SIZES = [(8192, 100), (8192, 1000), (1024, 32000), (8, 32000)]
COUNT_SHAPE = (128, 64, 32, 32)
SGD_MODELS = {"ResNet-18": ModelConfig(name="resnet18"), "VGG-like d5 g5": ModelConfig(name="vgg")}
OP_REPS = 50
OpCase = tuple[str, str, Callable[[], object], Callable[[], object]]  # op, size, ours, eager torch


def per_call(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds per call, after one untimed call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def kd_cases(device: torch.device, backend: str, sizes=KD_SIZES) -> Iterator[OpCase]:
    for (b, c), dtype in itertools.product(sizes, (torch.float32, torch.bfloat16)):
        s = torch.randn(b, c, device=device, dtype=dtype, requires_grad=True)
        t, y = torch.randn(b, c, device=device, dtype=dtype), torch.randint(0, c, (b,), device=device)
        yield ("kd_loss forward+backward", f"{b} x {c} {str(dtype)[6:]}",
               lambda s=s, t=t, y=y: kd_loss(s, t, y, backend=backend).backward(),
               lambda s=s, t=t, y=y: kd_loss_eager(s, t, y).backward())


def counting_cases(device: torch.device, backend: str, shape=COUNT_SHAPE) -> Iterator[OpCase]:
    x = torch.randn(shape, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    counts = torch.zeros(x[0].numel(), dtype=torch.int64, device=device)
    size = f"{tuple(shape)} bf16 channels_last"

    def counted_relu():  # what a forward hook that counts does beside the plain ReLU
        counts.add_((x > 0).flatten(1).sum(0))
        return torch.relu(x)

    yield ("relu_count", size, lambda: relu_count(x, counts, backend=backend), counted_relu)
    yield ("count_positive_", size, lambda: count_positive_(x, counts, backend=backend),
           lambda: counts.add_((x > 0).flatten(1).sum(0)))


def sgd_cases(device: torch.device, backend: str, models=SGD_MODELS, shape=(3, 32, 32)) -> Iterator[OpCase]:
    for name, cfg in models.items():
        torch.manual_seed(0)
        model = build_model(cfg, shape, 10).to(device)
        masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
        weights = prunable_weights(model)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        ours = MaskedSGD(model.parameters(), {weights[k]: m for k, m in masks.items()}, lr=0.01, backend=backend)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
        pairs = ([weights[k] for k in masks], list(masks.values()))

        @torch.no_grad()
        def eager(sgd=sgd, pairs=pairs):  # torch's multi-tensor SGD, then the masks applied again
            sgd.step()
            torch._foreach_mul_(*pairs)

        yield "masked_sgd step", f"{name}, 80 % sparse", ours.step, eager


def bench_ops(cases: Iterator[OpCase], device: torch.device,
              reps: int = OP_REPS) -> list[tuple[str, str, float, float]]:
    """(op, size, seconds per call of ours, of the eager torch code) for every case."""
    return [(op, size, per_call(ours, device, reps), per_call(eager, device, reps)) for op, size, ours, eager in cases]


def op_table(rows: list[tuple[str, str, float, float]]) -> list[str]:
    lines = ["| op | size | ours (µs) | eager torch (µs) | eager / ours |", "|---|---|---|---|---|"]
    return lines + [f"| {op} | {size} | {ours * 1e6:.1f} | {eager * 1e6:.1f} | {eager / ours:.2f} |"
                    for op, size, ours, eager in rows]


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA device here, and this benchmark measures on one only; nothing was "
              "measured", file=sys.stderr)
        sys.exit(2)
    g = torch.Generator().manual_seed(0)
    data = DeviceDataset(torch.randint(0, 256, (4096, 3, 32, 32), generator=g, dtype=torch.uint8).cuda(),
                         torch.randint(0, 10, (4096,), generator=g).cuda())
    lines = [f"Device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, 80 % sparse.", "",
             f"Training step, batch {BATCH}, the engine's epoch with augmentation:", "",
             "| model | mode | precision | layout | step (ms) | images/s | TFLOP/s (3 x fwd, 1/MAC) | capture (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, cfg in MODELS.items():
        fwd = measure_forward_flops(build_model(cfg, (3, 32, 32), 10), (3, 32, 32)).dense("fvcore")
        for graphs in (None, CudaGraphs()):
            for precision in ("fp32", "bf16"):
                for cl in (False, True):
                    t, capture = bench(cfg, graphs, precision, cl, data)
                    lines.append(f"| {name} | {'eager' if graphs is None else 'graphs'} | {precision} | "
                                 f"{'channels_last' if cl else 'NCHW'} | {t * 1e3:.2f} | {BATCH / t:,.0f} | "
                                 f"{3 * fwd * BATCH / t / 1e12:.2f} | "
                                 f"{'-' if graphs is None else f'{capture * 1e3:.0f}'} |")
    lines += ["", f"Evaluation pass over {len(data)} images, batch {EVAL_BATCH}, bf16, channels_last:", "",
              "| model | mode | counting | pass (ms) | images/s |", "|---|---|---|---|---|"]
    for name, cfg in MODELS.items():
        for graphs in (None, CudaGraphs()):
            for counting in (False, True):
                t = bench_eval(cfg, graphs, counting, "bf16", True, data)
                lines.append(f"| {name} | {'eager' if graphs is None else 'graphs'} | {'on' if counting else 'off'} | "
                             f"{t * 1e3:.2f} | {len(data) / t:,.0f} |")
    dev = torch.device("cuda")
    ops = itertools.chain(kd_cases(dev, "triton"), counting_cases(dev, "triton"), sgd_cases(dev, "triton"))
    lines += ["", f"Fused ops (Triton) against the eager torch code they replace, {OP_REPS} calls each:", "",
              *op_table(bench_ops(ops, dev))]
    table = "\n".join(lines)
    print(table)
    write_block("bench_gpu", "GPU: training step and evaluation, eager against CUDA graphs",
                "Command: `python benchmarks/bench_gpu.py`.\n\n" + table)

if __name__ == "__main__":
    main()
