"""Epoch time of dsd2's training loop against the way common reference code trains a pruned network.

Baseline, as in typical IMP reference code: a torchvision-style dataset with per-sample PIL
transforms behind a DataLoader, masks installed with `torch.nn.utils.prune` (weight recomputed as
weight_orig * weight_mask in every forward), a plain eager fp32 step. Ours: the whole dataset as a
uint8 tensor, batches as index slices, batched augmentation, dense weights kept sparse by the
masked optimizer step, channels_last for conv nets (the engine's default). The headline rows compare
fp32 with fp32; a bf16 row for the conv net is added only where this CPU computes bf16 natively
(AVX-512 BF16 or AMX), the only place `--precision auto` would pick it; elsewhere autocast emulates
bf16 and is many times slower.

Both run the same model, the same data and the same masks (80 % sparsity) in one process. Our C++ kernels run
at the best CPU level unless DSD2_CPU_ISA names a lower one; ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA do the
same for ATen and oneDNN, so

    DSD2_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_engine.py

measures on an AVX-512 machine what an AVX2 machine gets (no bf16 row then: an AVX2 CPU has no native bf16).
Each level writes its own block of RESULTS.md.

    python benchmarks/bench_engine.py            # full: writes the table into benchmarks/RESULTS.md
    python benchmarks/bench_engine.py --quick    # fewer repeats, prints only
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.utils.prune as tprune
from PIL import Image
from results_file import write_block  # benchmarks/, on the path of a script run from it
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dsd2 import rng
from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.models import build_model
from dsd2.ops import cpu_isa, cpu_model
from dsd2.pruning import full_masks as make_full_masks
from dsd2.pruning import global_prune, magnitude_scores, prunable_weights
from dsd2.training import InputFormat, TrainFeed, build_optimizer, cross_entropy, train_epoch
from dsd2.training.precision import native_bf16


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


def sparse_masks(model: nn.Module, sparsity: float = 0.8):
    masks = make_full_masks(model)
    return global_prune(magnitude_scores(model), masks, sparsity)


def baseline_epoch(model, loader, optimizer) -> None:
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def case(name: str, model_cfg: ModelConfig, images: np.ndarray, labels: np.ndarray, num_classes: int,
         optim: OptimConfig, augment: bool, bf16: bool, repeats: int) -> dict:
    shape = images.shape[1:]
    channels = shape[0]
    mean = images.reshape(len(images), channels, -1).mean(axis=(0, 2)) / 255.0
    std = images.reshape(len(images), channels, -1).std(axis=(0, 2)) / 255.0 + 1e-3

    # --- baseline ---------------------------------------------------------------------------
    torch.manual_seed(0)
    base_model = build_model(model_cfg, shape, num_classes)
    masks = sparse_masks(base_model)
    tfs = ([transforms.RandomCrop(shape[1], padding=4), transforms.RandomHorizontalFlip()] if augment else [])
    tfs += [transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())]
    loader = DataLoader(ArrayDataset(images, labels, transforms.Compose(tfs)), batch_size=optim.batch_size,
                        shuffle=True, num_workers=0)
    modules = dict(base_model.named_modules())
    for key, mask in masks.items():
        tprune.custom_from_mask(modules[key.rsplit(".", 1)[0]], "weight", mask)
    if optim.optimizer == "sgd":
        base_opt = torch.optim.SGD(base_model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                   weight_decay=optim.weight_decay)
    else:
        base_opt = torch.optim.Adam(base_model.parameters(), lr=optim.lr)
    t_base = time_it(lambda: baseline_epoch(base_model, loader, base_opt), repeats)

    # --- ours -------------------------------------------------------------------------------
    torch.manual_seed(0)
    conv = model_cfg.name in ("vgg", "resnet18")
    model = build_model(model_cfg, shape, num_classes)
    masks = sparse_masks(model)
    with torch.no_grad():
        for n, w in prunable_weights(model).items():
            w.mul_(masks[n])
    if conv:  # the engine's default for conv nets (--channels-last), in fp32 and bf16 alike
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, masks, optim)
    data = DeviceDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    m = torch.from_numpy(mean * 255).float()
    s = torch.from_numpy(std * 255).float()
    feed = TrainFeed(data, optim.batch_size, InputFormat(m, s, "bf16" if bf16 else "fp32", conv), augment)
    counter = iter(range(10**9))

    def epoch():  # the engine's eager epoch: a shuffle and augmentation stream per epoch
        e = next(counter)
        perm = torch.randperm(len(data), generator=rng.generator("shuffle", 0, 0, e))
        augmented = rng.generator("augment", 0, 0, e) if augment else None
        return train_epoch(model, opt, feed, cross_entropy, perm, augmented)

    t_ours = time_it(epoch, repeats)
    n = len(labels)
    return {"case": name, "images": n, "baseline_s": t_base, "ours_s": t_ours, "speedup": t_base / t_ours,
            "baseline_img_s": n / t_base, "ours_img_s": n / t_ours,
            "ours_mode": ("bf16" if bf16 else "fp32") + (" + channels_last" if conv else "")}


def machine() -> str:
    return (f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}, dsd2 kernels at {cpu_isa()}, the CPU's "
            f"bf16 {'native' if native_bf16('cpu') else 'emulated'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images; print only")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    repeats = 2 if args.quick else 5

    from sklearn.datasets import load_digits

    d = load_digits()
    digits_x = (d.images[:1000] * (255 / 16)).round().astype(np.uint8)[:, None]  # 8-bit like real loaders
    digits_y = d.target[:1000]
    rows = [case("embedded default: digits, MLP 64-256-256-10, Adam, batch 64", ModelConfig(name="mlp"),
                 digits_x, digits_y, 10, OptimConfig(optimizer="adam", lr=1e-3, batch_size=64),
                 augment=False, bf16=False, repeats=repeats)]

    n = 256 if args.quick else 1024
    rng = np.random.default_rng(0)
    cifar_x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    cifar_y = rng.integers(0, 10, size=n)
    vgg = ("VGG-like d=5 g=5, synthetic CIFAR-shaped data, SGD, batch 128, crop+flip",
           ModelConfig(name="vgg", depth=5, width=5), cifar_x, cifar_y, 10,
           OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128))
    rows.append(case(*vgg, augment=True, bf16=False, repeats=max(1, repeats - 2)))
    lowered = os.environ.get("DSD2_CPU_ISA", "avx512") not in ("", "avx512")
    if native_bf16("cpu") and not lowered:
        rows.append(case(*vgg, augment=True, bf16=True, repeats=max(1, repeats - 2)))

    table = ["| case | images/epoch | baseline epoch (s, fp32) | ours epoch (s) | ours mode | speed-up |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['case']} | {r['images']} | {r['baseline_s']:.3f} | {r['ours_s']:.3f} | "
                     f"{r['ours_mode']} | **{r['speedup']:.2f}x** |")
    text = "\n".join(table)
    print(machine())
    print(text)
    if not args.quick:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("DSD2_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                       if os.environ.get(k))
        write_block(f"bench_engine-{cpu_isa()}", f"Engine: epoch time, dsd2 kernels at {cpu_isa()}",
                    f"Machine: {machine()}.\nCommand: `{env + ' ' if env else ''}python benchmarks/bench_engine.py` "
                    f"(median of {repeats} epochs for the MLP, {max(1, repeats - 2)} for VGG, after one warm-up).\n\n"
                    f"{text}")


if __name__ == "__main__":
    main()
