"""GPU benchmark of the engine's step: eager against CUDA graphs, fp32 against bf16, channels_last, for the
teacher (ResNet-18) and student (VGG-like d=5 g=5) presets on CIFAR-shaped data, 80 % sparse.

    python benchmarks/bench_gpu.py            # prints the tables and writes them into benchmarks/RESULTS.md

Training step at batch 128: step time, images/s and achieved TFLOP/s (training FLOPs = 3 x the dense forward,
fvcore convention, 1 FLOP per multiply-add), and for graphs the one-off warm-up + capture time that each level
pays (a level builds a new optimizer, hence a new capture). Evaluation at batch 512 (the engine's): eager
`predict` against `GraphedPredictor`, with the ReLU-state counting off and on. Every variant is measured in
the same run as the others.
"""

from __future__ import annotations

import sys
import time

import torch
from results_file import write_block  # benchmarks/, on the path of a script run from it

from dsd2.analysis.flops import measure_forward_flops
from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.data.batching import normalize
from dsd2.models import build_model
from dsd2.ops import swap_in_counting_relus
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import InputFormat, TrainFeed, autocast, build_optimizer, cross_entropy, predict
from dsd2.training.graphs import CudaGraphs, GraphedPredictor, GraphedTrainStep

BATCH, STEPS, EVAL_BATCH, EVAL_PASSES = 128, 50, 512, 5
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
          batch: int = BATCH, steps: int = STEPS) -> tuple[float, float]:
    """(seconds per training step, seconds of warm-up + capture); `graphs`: a graph maker, or None for eager."""
    dev = data.images.device
    model, opt = make(cfg, channels_last, dev)
    mean, std = torch.full((3,), 120.0, device=dev), torch.full((3,), 64.0, device=dev)
    idx = [torch.randint(0, len(data), (batch,), device=dev) for _ in range(steps + 5)]
    capture = 0.0
    if graphs is not None:
        sync(dev)
        t0 = time.perf_counter()
        feed = TrainFeed(data, batch, InputFormat(mean, std, precision, channels_last), augment=True)
        step = GraphedTrainStep(model, opt, cross_entropy, feed, warmup_indices=idx[:3], lr=0.01, graphs=graphs)
        sync(dev)
        capture = time.perf_counter() - t0
        run = lambda i: step.replay(i, 0.01)
    else:
        def run(i):
            x = normalize(data.images[i], mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, precision):
                loss = cross_entropy(model(x), data.labels[i], x, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for i in idx[:5]:
        run(i)
    sync(dev)
    t0 = time.perf_counter()
    for i in idx[5:]:
        run(i)
    sync(dev)
    return (time.perf_counter() - t0) / steps, capture


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
    run()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(passes):
        run()
    sync(dev)
    return (time.perf_counter() - t0) / passes


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured")
        sys.exit(0)
    g = torch.Generator().manual_seed(0)
    data = DeviceDataset(torch.randint(0, 256, (4096, 3, 32, 32), generator=g, dtype=torch.uint8).cuda(),
                         torch.randint(0, 10, (4096,), generator=g).cuda())
    lines = [f"Device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, 80 % sparse.", "",
             f"Training step, batch {BATCH}:", "",
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
    table = "\n".join(lines)
    print(table)
    write_block("bench_gpu", "GPU: training step and evaluation, eager against CUDA graphs",
                "Command: `python benchmarks/bench_gpu.py`.\n\n" + table)

if __name__ == "__main__":
    main()
