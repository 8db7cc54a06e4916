"""GPU training-step benchmark: eager against CUDA graphs, fp32 against bf16, channels_last, for the teacher
(ResNet-18) and student (VGG-like d=5 g=5) presets at batch 128 on CIFAR-shaped data, 80 % sparse.

    python benchmarks/bench_gpu.py            # prints the table and appends it to benchmarks/RESULTS.md

Reports step time, images/s and achieved TFLOP/s (training FLOPs = 3 x the dense forward, fvcore
convention, 1 FLOP per multiply-add) in one run, so every variant is measured against the others.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from dsd2.analysis.flops import measure_forward_flops
from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.data.batching import normalize
from dsd2.models import build_model
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import autocast, build_optimizer, cross_entropy
from dsd2.training.graphs import GraphedTrainStep

BATCH, STEPS = 128, 50
MODELS = {"teacher ResNet-18": ModelConfig(name="resnet18"), "student VGG-like d5 g5": ModelConfig(name="vgg")}


def make(cfg: ModelConfig, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(cfg, (3, 32, 32), 10).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    opt = build_optimizer(model, masks, OptimConfig(optimizer="sgd", lr=0.01, weight_decay=1e-4))
    return model, opt


def bench(cfg: ModelConfig, graphs: bool, precision: str, channels_last: bool, data: DeviceDataset) -> float:
    model, opt = make(cfg, channels_last)
    mean, std = torch.full((3,), 120.0, device="cuda"), torch.full((3,), 64.0, device="cuda")
    idx = [torch.randint(0, len(data), (BATCH,), device="cuda") for _ in range(STEPS + 5)]
    if graphs:
        step = GraphedTrainStep(model, opt, cross_entropy, data, BATCH, mean, std, augment=True,
                                precision=precision, channels_last=channels_last, warmup_indices=idx[:3], lr=0.01)
        run = lambda i: step.replay(i, 0.01)
    else:
        def run(i):
            x = normalize(data.images[i], mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(torch.device("cuda"), precision):
                loss = cross_entropy(model(x), data.labels[i], x, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for i in idx[:5]:
        run(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in idx[5:]:
        run(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / STEPS


def main() -> None:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured")
        sys.exit(0)
    g = torch.Generator().manual_seed(0)
    data = DeviceDataset(torch.randint(0, 256, (4096, 3, 32, 32), generator=g, dtype=torch.uint8).cuda(),
                         torch.randint(0, 10, (4096,), generator=g).cuda())
    lines = [f"Device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, batch {BATCH}, 80 % sparse.",
             "", "| model | mode | precision | layout | step (ms) | images/s | TFLOP/s (3 x fwd, 1/MAC) |",
             "|---|---|---|---|---|---|---|"]
    for name, cfg in MODELS.items():
        fwd = measure_forward_flops(build_model(cfg, (3, 32, 32), 10), (3, 32, 32)).dense("fvcore")
        for graphs in (False, True):
            for precision in ("fp32", "bf16"):
                for cl in (False, True):
                    t = bench(cfg, graphs, precision, cl, data)
                    lines.append(f"| {name} | {'graphs' if graphs else 'eager'} | {precision} | "
                                 f"{'channels_last' if cl else 'NCHW'} | {t * 1e3:.2f} | {BATCH / t:,.0f} | "
                                 f"{3 * fwd * BATCH / t / 1e12:.2f} |")
    table = "\n".join(lines)
    print(table)
    results = Path(__file__).with_name("RESULTS.md")
    results.write_text(results.read_text().rstrip() + "\n\n## GPU training step (bench_gpu.py)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
