"""Epoch time of dsd2's training loop against what a user would run instead, in one run, with the epoch's floor.

Two cases, each with the same model, data, optimizer and 80 % masks (global magnitude) in every row:
the embedded default's MLP (64-256-256-10 on 1,000 digits, Adam lr 1e-3, batch 64) and the VGG-like
(d = 5, g = 5) on CIFAR-shaped synthetic data (SGD 0.1, momentum 0.9, wd 1e-4, batch 128, random crop + flip).

- ours: the engine's executor as `dsd2-engine train` makes it (masked layers; for the MLP the fused CPU epoch,
  one C++ call, at the one thread an MLP run computes at; for the VGG-like the eager step in channels_last at
  torch's thread count), fp32. Where this CPU computes bf16 natively, a second VGG-like row trains as
  `--precision auto` does there (bf16 autocast), against the same fp32 baselines;
- (a) reference-code loop: a torchvision-style dataset with per-sample PIL transforms behind a DataLoader, masks
  as `torch.nn.utils.prune` hooks, a plain eager step (what IMP reference code does);
- (b) plain eager loop: the data as one normalised float tensor, index batches (the crop + flip batched: one
  crop offset per batch, a flip per image), `torch.optim`, the masks multiplied into the weights after each step:
  the twenty lines a competent user writes; at 1 and at 2 threads, the faster counts;
- (c) (b) with forward + loss + backward + step under `torch.compile` (compile time excluded), at its faster
  thread count too;
- floor: the epoch's multiply-adds of its convs and linears (forward and both backward products, but the first
  layer's input gradient) at the best rate this machine reaches on a 1024x1024x1024 fp32 product (1 or 2 threads).

Our C++ kernels run at the best CPU level unless DSD2_CPU_ISA names a lower one; ATEN_CPU_CAPABILITY and
ONEDNN_MAX_CPU_ISA do the same for ATen and oneDNN, so

    DSD2_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_engine.py

measures on an AVX-512 machine what an AVX2 machine gets (no bf16 row then). Each level writes its own block of
RESULTS.md.

    python benchmarks/bench_engine.py              # writes the table into benchmarks/RESULTS.md
    python benchmarks/bench_engine.py --quick      # fewer repeats and VGG images, prints only
    python benchmarks/bench_engine.py --no-compile # leaves (c) out
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from PIL import Image
from results_file import write_block  # benchmarks/, on the path of a script run from it
from timing import time_it, timed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dsd2.analysis.flops import layer_macs
from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.models import Conv2d, build_model
from dsd2.ops import cpu_isa, cpu_model
from dsd2.ops.masked_layers import set_layer_masks, swap_in_masked_layers
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import InputFormat, TrainFeed, build_optimizer, cross_entropy
from dsd2.training.distributed import DistContext
from dsd2.training.executor import make_executor
from dsd2.training.precision import native_bf16


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor
    optim: OptimConfig
    augment: bool

    @property
    def conv(self) -> bool:
        return self.model.name != "mlp"


def pruned_model(case: Case) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The case's model with 80 % of its prunable weights (global magnitude) zero, the same in every row."""
    torch.manual_seed(0)
    model = build_model(case.model, tuple(case.images.shape[1:]), 10)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
    with torch.no_grad():
        for name, w in prunable_weights(model).items():
            w.mul_(masks[name])
    return model, masks


def statistics_of(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    x = case.images.float()
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)) + 1e-3


def plain_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=optim.lr)


# ---- ours ------------------------------------------------------------------------------------------------------

def ours(case: Case, precision: str = "fp32", cpu_step: str = "auto"):
    """(mode, epoch) of the engine's executor on the case."""
    model, masks = pruned_model(case)
    if case.conv:  # the engine's default for conv nets (--channels-last)
        model = model.to(memory_format=torch.channels_last)
    model, _ = swap_in_masked_layers(model, same_as=(Conv2d,))
    set_layer_masks(model, masks)
    mean, std = statistics_of(case)
    feed = TrainFeed(DeviceDataset(case.images, case.labels), case.optim.batch_size,
                     InputFormat(mean, std, precision, case.conv), case.augment)
    ex = make_executor(model, feed, cross_entropy, {}, 0, 10, dist_ctx=DistContext(), cpu_step=cpu_step)
    opt = build_optimizer(model, masks, case.optim)
    counter = iter(range(10**9))
    return ex.mode, lambda: ex.train_epoch(opt, 0, next(counter), case.optim.lr)


# ---- (a) the reference-code loop ---------------------------------------------------------------------------------

class ArrayDataset(Dataset):
    """What torchvision's CIFAR10/MNIST datasets do: one PIL image per sample through transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        pil = Image.fromarray(img.squeeze(0) if img.shape[0] == 1 else img.transpose(1, 2, 0))
        return self.transform(pil), int(self.labels[i])


def reference_loop(case: Case):
    model, masks = pruned_model(case)
    mean, std = statistics_of(case)
    side = case.images.shape[-1]
    tfs = [transforms.RandomCrop(side, padding=4), transforms.RandomHorizontalFlip()] if case.augment else []
    tfs += [transforms.ToTensor(), transforms.Normalize((mean / 255).tolist(), (std / 255).tolist())]
    loader = DataLoader(ArrayDataset(case.images.numpy(), case.labels.numpy(), transforms.Compose(tfs)),
                        batch_size=case.optim.batch_size, shuffle=True, num_workers=0)
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        tprune.custom_from_mask(modules[key.rsplit(".", 1)[0]], "weight", mask)
    opt = plain_optimizer(model, case.optim)

    def epoch():
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return epoch


# ---- (b), (c) the plain loop, eager and compiled -------------------------------------------------------------------

def plain_loop(case: Case, compiled: bool):
    model, masks = pruned_model(case)
    weights = prunable_weights(model)
    pairs = [(weights[n], masks[n]) for n in masks]
    opt = plain_optimizer(model, case.optim)
    mean, std = statistics_of(case)
    xs = (case.images.float() - mean[:, None, None]) / std[:, None, None]
    ys, batch, side = case.labels, case.optim.batch_size, case.images.shape[-1]

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compiled else step

    def epoch():
        model.train()
        perm = torch.randperm(len(ys))
        for s in range(0, len(ys), batch):
            i = perm[s:s + batch]
            xb = xs[i]
            if case.augment:
                dx, dy = torch.randint(0, 9, (2,)).tolist()
                xb = F.pad(xb, (4, 4, 4, 4))[:, :, dy:dy + side, dx:dx + side]
                xb = torch.where(torch.rand(len(i), 1, 1, 1) < 0.5, xb.flip(3), xb)
            run(xb, ys[i])
            with torch.no_grad():
                for w, m in pairs:
                    w.mul_(m)

    return epoch


# ---- the floor, and timing -------------------------------------------------------------------------------------

def gemm_rate() -> float:
    """Multiply-adds per second of a 1024^3 fp32 product at the current thread count (the best of 10)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = min(timed(lambda: a @ b) for _ in range(10))
    return 1024**3 / t


def epoch_macs(case: Case) -> float:
    """Forward, weight-gradient and input-gradient products of every conv and linear over one epoch; the first
    layer needs no input gradient."""
    model, _ = pruned_model(case)
    per_layer = list(layer_macs(model, tuple(case.images.shape[1:])).values())
    return len(case.labels) * (3 * sum(per_layer) - per_layer[0])


def at_threads(threads: int, make, repeats: int) -> float:
    torch.set_num_threads(threads)
    try:
        return time_it(make(), repeats)
    finally:
        torch.set_num_threads(THREADS)


THREADS = torch.get_num_threads()


def best_threads(make, repeats: int) -> tuple[float, int]:
    """(the faster median, its thread count) at 1 thread and at all threads."""
    return min((at_threads(t, make, repeats), t) for t in sorted({1, THREADS}))


def machine() -> str:
    return (f"{cpu_model()}, {THREADS} threads, torch {torch.__version__}, ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}, dsd2 kernels at {cpu_isa()}, the CPU's "
            f"bf16 {'native' if native_bf16('cpu') else 'emulated'}")


def measure(case: Case, precision: str, repeats: int, compile_: bool, floor_rate: float) -> dict:
    mode, _ = ours(case, precision)
    ours_threads = 1 if not case.conv else THREADS  # dsd2/run/cores.py: an MLP run computes at one thread
    t_ours = at_threads(ours_threads, lambda: ours(case, precision)[1], repeats)
    t_ref = at_threads(THREADS, lambda: reference_loop(case), repeats)
    t_plain = best_threads(lambda: plain_loop(case, compiled=False), repeats)
    t_comp = None
    if compile_:
        try:
            t_comp = best_threads(lambda: plain_loop(case, compiled=True), repeats)
        except Exception as exc:  # noqa: BLE001 - a compiler failure is a result of this row, not of the benchmark
            t_comp = f"failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:80]})"
    floor = epoch_macs(case) / floor_rate
    return {"case": case.name, "precision": precision, "mode": mode, "ours_threads": ours_threads, "ours": t_ours,
            "ref": t_ref, "plain": t_plain, "compiled": t_comp, "floor": floor}


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def table(rows: list[dict]) -> str:
    out = ["| case | ours | (a) reference loop | (b) plain loop | (c) compiled | floor | ours vs (a) | vs (b) | "
           "vs (c) | ours / floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (tb, nb), comp = r["plain"], r["compiled"]
        c_cell = f"{fmt_s(comp[0])} ({comp[1]} thr)" if isinstance(comp, tuple) else comp or "not run"
        c_ratio = f"{comp[0] / r['ours']:.2f}×" if isinstance(comp, tuple) else "–"
        out.append(f"| {r['case']}, ours {r['precision']} ({r['mode']}, {r['ours_threads']} thr) | "
                   f"{fmt_s(r['ours'])} | {fmt_s(r['ref'])} ({THREADS} thr) | {fmt_s(tb)} ({nb} thr) | {c_cell} | "
                   f"{fmt_s(r['floor'])} | {r['ref'] / r['ours']:.2f}× | {tb / r['ours']:.2f}× | {c_ratio} | "
                   f"{r['ours'] / r['floor']:.1f}× |")
    return "\n".join(out)


def cases(quick: bool) -> list[Case]:
    from sklearn.datasets import load_digits

    d = load_digits()
    digits_x = torch.from_numpy((d.images[:1000] * (255 / 16)).round().astype(np.uint8))[:, None]
    mlp = Case("digits MLP 64-256-256-10, Adam, batch 64, 1,000 images", ModelConfig(name="mlp"), digits_x,
               torch.from_numpy(d.target[:1000]).long(), OptimConfig(optimizer="adam", lr=1e-3, batch_size=64),
               augment=False)
    n = 256 if quick else 512
    g = np.random.default_rng(0)
    vgg = Case(f"VGG-like d=5 g=5, synthetic 32x32, SGD, batch 128, crop+flip, {n} images",
               ModelConfig(name="vgg", depth=5, width=5),
               torch.from_numpy(g.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)),
               torch.from_numpy(g.integers(0, 10, size=n)).long(),
               OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128), augment=True)
    return [mlp, vgg]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images; print only")
    parser.add_argument("--no-compile", action="store_true", help="leave out (c), the torch.compile loop")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    repeats = 3 if args.quick else 7
    rate = max(gemm_rate_at(t) for t in sorted({1, THREADS}))
    mlp, vgg = cases(args.quick)
    rows = [measure(mlp, "fp32", repeats * 3, not args.no_compile, rate),
            measure(vgg, "fp32", repeats, not args.no_compile, rate)]
    lowered = os.environ.get("DSD2_CPU_ISA", "avx512") not in ("", "avx512")
    if native_bf16("cpu") and not lowered:
        rows.append(measure(vgg, "bf16", repeats, False, rate))
    text = table(rows)
    print(machine())
    print(text)
    if not args.quick:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("DSD2_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                       if os.environ.get(k))
        write_block(f"bench_engine-{cpu_isa()}", f"Engine: epoch time, dsd2 kernels at {cpu_isa()}",
                    f"Machine: {machine()}.\nCommand: `{env + ' ' if env else ''}python benchmarks/bench_engine.py` "
                    f"(median of {repeats * 3} epochs for the MLP, {repeats} for the VGG-like, after a warm-up one; "
                    f"every row in this one run; floor at {rate / 1e9:.0f} G multiply-adds/s).\n\n{text}")


def gemm_rate_at(threads: int) -> float:
    torch.set_num_threads(threads)
    try:
        return gemm_rate()
    finally:
        torch.set_num_threads(THREADS)


if __name__ == "__main__":
    main()
