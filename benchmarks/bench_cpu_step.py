"""The digits MLP's training epoch on the CPU: dsd2's fused epoch against its eager epoch and against the loops a
user would write instead, all in one run, at 1 and 2 threads, with the epoch's arithmetic floor.

Every row trains the embedded default's model and step: MLP 64-256-256-10 on 1,000 digits (batch 64, the last
batch 40), Adam lr 1e-3, 80 % of the weights masked (global magnitude), cross-entropy, a fresh shuffle per epoch.

- ours, fused: the engine's executor as `dsd2-engine train` picks it (`--cpu-step auto`): one C++ call per epoch;
- ours, eager: the same executor with `--cpu-step eager` (masked layers, MaskedAdam, Python per step);
- plain eager loop: tensor batches already normalised, `torch.optim.Adam`, the masks multiplied into the weights
  after each step: the twenty lines a competent user writes;
- plain loop under torch.compile: that loop's forward + loss + backward + step compiled (compile time excluded);
- floor: the epoch's multiply-adds (forward, and the two backward products but the first layer's input
  gradient) at the GEMM rate this machine measures for a 1024x1024x1024 fp32 product at the same thread count.

    python benchmarks/bench_cpu_step.py            # median of 20 epochs per row after a warm-up one; the table
                                                   # goes into benchmarks/RESULTS.md
    python benchmarks/bench_cpu_step.py --no-compile
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_engine import machine, time_it  # benchmarks/, on the path of a script run from it
from results_file import write_block

from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.models import build_model
from dsd2.ops import cpu_isa
from dsd2.ops.masked_layers import set_layer_masks, swap_in_masked_layers
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import InputFormat, TrainFeed, build_optimizer, cross_entropy
from dsd2.training.distributed import DistContext
from dsd2.training.executor import make_executor

BATCH, EPOCHS = 64, 20


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images[:1000] * (255 / 16)).round().astype(np.uint8))[:, None]
    return x, torch.from_numpy(d.target[:1000]).long()


def pruned_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), (1, 8, 8), 10)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
    with torch.no_grad():
        for name, w in prunable_weights(model).items():
            w.mul_(masks[name])
    return model, masks


def ours(x, y, cpu_step: str):
    model, masks = pruned_model()
    model, _ = swap_in_masked_layers(model)
    set_layer_masks(model, masks)
    mean, std = x.float().mean().reshape(1), x.float().std().reshape(1)
    feed = TrainFeed(DeviceDataset(x, y), BATCH, InputFormat(mean, std))
    ex = make_executor(model, feed, cross_entropy, {}, 0, 10, dist_ctx=DistContext(), cpu_step=cpu_step)
    opt = build_optimizer(model, masks, OptimConfig(optimizer="adam", lr=1e-3, batch_size=BATCH))
    counter = iter(range(10**9))
    return ex.mode, lambda: ex.train_epoch(opt, 0, next(counter), 1e-3)


def plain(x, y, compiled: bool):
    model, masks = pruned_model()
    weights = prunable_weights(model)
    pairs = [(weights[n], masks[n]) for n in masks]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs = ((x.float() - x.float().mean()) / x.float().std()).flatten(1)

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compiled else step

    def epoch():
        perm = torch.randperm(len(y))
        for s in range(0, len(y), BATCH):
            i = perm[s:s + BATCH]
            run(xs[i], y[i])
            with torch.no_grad():
                for w, m in pairs:
                    w.mul_(m)

    return epoch


def gemm_rate() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = min(_timed(lambda: a @ b) for _ in range(10))
    return 2 * 1024**3 / t


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def epoch_flops(n: int) -> float:
    sizes = [(64, 256), (256, 256), (256, 10)]
    macs = sum(3 * n * i * o for i, o in sizes) - n * sizes[0][0] * sizes[0][1]
    return 2.0 * macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    x, y = digits()
    table = ["| threads | ours, fused | ours, eager | plain eager loop (b) | (b) under torch.compile (c) | floor | "
             "fused vs eager | fused vs (b) | fused vs (c) | fused / floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        mode, fused = ours(x, y, "auto")
        assert mode == "fused-cpu", mode
        t_fused = time_it(fused, EPOCHS)
        t_eager = time_it(ours(x, y, "eager")[1], EPOCHS)
        t_plain = time_it(plain(x, y, compiled=False), EPOCHS)
        t_comp = None if args.no_compile else time_it(plain(x, y, compiled=True), EPOCHS)
        floor = epoch_flops(len(y)) / gemm_rate()
        comp = f"{t_comp * 1e3:.1f} ms" if t_comp else "not run"
        vs_comp = f"{t_comp / t_fused:.2f}×" if t_comp else "–"
        table.append(f"| {threads} | {t_fused * 1e3:.1f} ms | {t_eager * 1e3:.1f} ms | {t_plain * 1e3:.1f} ms | {comp} "
                     f"| {floor * 1e3:.1f} ms | {t_eager / t_fused:.2f}× | {t_plain / t_fused:.2f}× | {vs_comp} | "
                     f"{t_fused / floor:.1f}× |")
    text = "\n".join(table)
    torch.set_num_threads(2)
    print(machine())
    print(text)
    write_block(f"bench_cpu_step-{cpu_isa()}", f"CPU step: the digits MLP's epoch, dsd2 kernels at {cpu_isa()}",
                f"Machine: {machine()} (thread count per row).\nCommand: `python benchmarks/bench_cpu_step.py` (median "
                f"of {EPOCHS} epochs per row after a warm-up one; every row in this one run).\n\n{text}")


if __name__ == "__main__":
    main()
