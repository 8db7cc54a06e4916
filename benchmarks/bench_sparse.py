"""Faster as it gets sparser: the masked layers' sparse path against their dense path, in one run, machine named.

- (a) one layer, forward + backward (dX, dW, db), at sparsity 0, 50, 80, 90, 95, 98 and 99.5 % (a random mask
  of that density): the VGG-like's (d = 5, g = 5) and ResNet-18's conv shapes at CIFAR size, batch 128, in
  channels_last (as the engine trains them), and the MLP's and LeNet-300-100's linear layers at their batch.
  Dense: the masked layer's dense path (`--sparse-kernels off`, what every run computed before: oneDNN on W⊙M,
  within 5 % of the plain layer), and the plain nn.Conv2d / nn.Linear on a weight with the zeros in it, what a
  user of torch.nn.utils.prune would run at best. Sparse: `--sparse-kernels on`.
- (b) a whole VGG-like training epoch (the engine's executor, SGD, batch 128, crop + flip, synthetic CIFAR-shaped
  data) at the sparsity of levels 5, 10, 15, 20 and 25 (every prunable layer at that sparsity, by magnitude):
  `off` against `auto` (the crossover measured here, then cached), fp32, timed in turn; where this CPU computes
  bf16 natively, the dense epoch in bf16 (what `--precision auto` trains there) too. The bound: the dense
  epoch's time outside the conv/linear products (BatchNorm, ReLU, pooling, the loss, the optimizer, data), from
  torch.profiler; no sparsity of the products can make the epoch faster than that. Then the floor of the sparse
  path, measured: the epoch with one weight kept per layer on `on` (its passes over the maps and everything
  outside the products), and what BatchNorm and ReLU cost there and in the dense epoch (both epochs timed again
  with them taken out).
- (c) inference latency at batch 1 and 128 of a model `dsd2.load_compressed` returns (written by the exporter's
  own function; its layers on `auto`, the crossover measured for inference at that batch, and the VGG-like's
  feature stack on grids where it measures faster, `SparseStack`) against the same model dense (the plain
  layers, eval, no_grad), and against our model layer by layer (its stack off): the VGG-like at 98.8 % and the
  digits MLP at 98.8 %; and the file's size against the dense weights'.

    python benchmarks/bench_sparse.py           # writes the tables into benchmarks/RESULTS.md
    python benchmarks/bench_sparse.py --quick   # fewer repeats and shapes, prints only
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_block  # benchmarks/, on the path of a script run from it
from timing import time_it, time_together
from torch import nn

import dsd2
from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.export import compressed_bytes
from dsd2.models import Conv2d, build_model
from dsd2.ops import MaskedConv2d, MaskedLinear, cpu_isa, cpu_model, set_sparse_kernels, sparse_paths
from dsd2.ops.batch_norm import fuse_relu_batch_norms, swap_in_batch_norms
from dsd2.ops.masked_layers import set_layer_masks, swap_in_masked_layers
from dsd2.ops.pooling import swap_in_max_pools
from dsd2.pruning import full_masks, prunable_weights
from dsd2.training import InputFormat, TrainFeed, build_optimizer, cross_entropy
from dsd2.training.distributed import DistContext
from dsd2.training.executor import make_executor
from dsd2.training.precision import native_bf16

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.995)
LEVELS = {5: 0.67, 10: 0.89, 15: 0.965, 20: 0.988, 25: 0.996}  # 1 - 0.8**level, rounded as the issue names them
THREADS = torch.get_num_threads()

# (name, in, out, kernel, stride, map size)
VGG_CONVS = [("vgg b1 3→32", 3, 32, 3, 1, 32), ("vgg b1 32→32", 32, 32, 3, 1, 32), ("vgg b2 32→64", 32, 64, 3, 1, 16),
             ("vgg b2 64→64", 64, 64, 3, 1, 16), ("vgg b3 64→128", 64, 128, 3, 1, 8),
             ("vgg b3 128→128", 128, 128, 3, 1, 8), ("vgg b4 128→256", 128, 256, 3, 1, 4),
             ("vgg b4 256→256", 256, 256, 3, 1, 4), ("vgg b5 256→512", 256, 512, 3, 1, 2),
             ("vgg b5 512→512", 512, 512, 3, 1, 2)]
RESNET_CONVS = [("resnet 64→64", 64, 64, 3, 1, 32), ("resnet 64→128 s2", 64, 128, 3, 2, 32),
                ("resnet 128→128", 128, 128, 3, 1, 16), ("resnet 128→256 s2", 128, 256, 3, 2, 16),
                ("resnet 256→256", 256, 256, 3, 1, 8), ("resnet 256→512 s2", 256, 512, 3, 2, 8),
                ("resnet 512→512", 512, 512, 3, 1, 4), ("resnet 1x1 64→128 s2", 64, 128, 1, 2, 32)]
# (name, in, out, batch)
LINEARS = [("digits MLP 64→256", 64, 256, 64), ("digits MLP 256→256", 256, 256, 64),
           ("LeNet-300-100 784→300", 784, 300, 128), ("LeNet-300-100 300→100", 300, 100, 128)]


def machine() -> str:
    return (f"{cpu_model()}, {THREADS} threads, torch {torch.__version__}, dsd2 kernels at {cpu_isa()}, "
            f"ATen capability {torch.backends.cpu.get_cpu_capability()}")


def fmt(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


# ---- (a) one layer -------------------------------------------------------------------------------------------

def layer_case(layer: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, list[float]]:
    """(plain, dense masked, sparse at each of SPARSITIES) seconds of forward + backward."""
    gen = torch.Generator().manual_seed(0)
    x = x.requires_grad_()

    def step(module):
        def run():
            out = module(x)
            out.backward(torch.ones_like(out))
            module.weight.grad = x.grad = None
            if module.bias is not None:
                module.bias.grad = None
        return run

    plain = layer.to_dense()
    t_plain = time_it(step(plain), repeats)
    layer.sparse_kernels = "off"
    t_dense = time_it(step(layer), repeats)
    layer.sparse_kernels = "on"
    sparse = []
    for sparsity in SPARSITIES:
        with torch.no_grad():
            layer.mask.copy_(torch.rand(layer.weight.shape, generator=gen) >= sparsity)
        sparse.append(time_it(step(layer), repeats))
    return t_plain, t_dense, sparse


def bench_layers(quick: bool, repeats: int) -> str:
    rows = ["| layer | input | plain | dense masked | " + " | ".join(f"{s:.1%}" for s in SPARSITIES) + " |",
            "|---|---|---|---|" + "---|" * len(SPARSITIES)]
    convs = (VGG_CONVS[1::3] + RESNET_CONVS[1:2]) if quick else VGG_CONVS + RESNET_CONVS
    torch.manual_seed(0)
    for name, cin, cout, k, stride, size in convs:
        layer = MaskedConv2d(cin, cout, k, stride, k // 2).to(memory_format=torch.channels_last)
        x = torch.randn(128, cin, size, size).contiguous(memory_format=torch.channels_last)
        rows.append(_layer_row(name, f"128×{cin}×{size}²", *layer_case(layer, x, repeats)))
        print(rows[-1], flush=True)
    for name, cin, cout, batch in LINEARS[:2] if quick else LINEARS:
        layer = MaskedLinear(cin, cout)
        rows.append(_layer_row(name, f"{batch}×{cin}", *layer_case(layer, torch.randn(batch, cin), repeats)))
        print(rows[-1], flush=True)
    return "\n".join(rows)


def _layer_row(name, shape, t_plain, t_dense, sparse) -> str:
    cells = [f"{fmt(t)} ({t_dense / t:.1f}×)" for t in sparse]
    return f"| {name} | {shape} | {fmt(t_plain)} | {fmt(t_dense)} | " + " | ".join(cells) + " |"


# ---- (b) a VGG-like training epoch ---------------------------------------------------------------------------

def vgg_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(0)
    return (torch.from_numpy(g.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)),
            torch.from_numpy(g.integers(0, 10, size=n)).long())


def pruned(cfg: ModelConfig, shape, sparsity: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model with `sparsity` of each prunable layer's weights zero (the smallest magnitudes of that layer).
    Layer by layer, not global: a global threshold at initialisation would empty the last blocks entirely (their
    fan-in is largest, so their initial weights are smallest), which masks after training do not."""
    torch.manual_seed(0)
    model = build_model(cfg, shape, 10)
    masks = full_masks(model)
    with torch.no_grad():
        for name, w in prunable_weights(model).items():
            keep = max(1, round((1 - sparsity) * w.numel()))
            order = w.abs().flatten().argsort(descending=True)
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[order[:keep]] = True
            masks[name] = mask.view_as(w)
            w.mul_(masks[name])
    return model, masks


def vgg_epoch(images, labels, sparsity: float, mode: str, precision: str, strip: bool = False,
              torch_ops: bool = False):
    """An epoch of the VGG-like at `sparsity` (`strip`: its BatchNorms and ReLUs taken out, an ablation that
    measures what they cost; `torch_ops`: torch's BatchNorm2d, ReLU and MaxPool2d kept, as before the loop
    trained on dsd2's BatchNorm with the ReLU before it fused in and dsd2's max pool)."""
    model, masks = pruned(ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32), sparsity)
    if strip:
        for i, m in enumerate(model.features):
            if isinstance(m, (nn.BatchNorm2d, nn.ReLU)):
                model.features[i] = nn.Identity()
    model = model.to(memory_format=torch.channels_last)
    model, _ = swap_in_masked_layers(model, same_as=(Conv2d,))
    if not torch_ops:
        model = fuse_relu_batch_norms(swap_in_max_pools(swap_in_batch_norms(model)))  # as the loop does
    set_layer_masks(model, masks)
    set_sparse_kernels(model, mode)
    x = images.float()
    optim = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128)
    feed = TrainFeed(DeviceDataset(images, labels), 128,
                     InputFormat(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)) + 1e-3, precision, True), True)
    ex = make_executor(model, feed, cross_entropy, {}, 0, 10, dist_ctx=DistContext(), cpu_step="eager")
    opt = build_optimizer(model, masks, optim)
    counter = iter(range(10**9))
    return model, lambda: ex.train_epoch(opt, 0, next(counter), optim.lr)


PRODUCTS = re.compile(r"conv|mkldnn|addmm|\bmm\b|linear|Masked|SmallMap|Sparse|masked_weight|im2col|col2im|unfold")


def outside_products(epoch) -> tuple[float, float]:
    """(seconds outside the conv/linear products, total seconds) of one epoch, from torch.profiler's self times."""
    epoch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        epoch()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if PRODUCTS.search(e.key))
    scale = 1e-6
    return (total - products) * scale, total * scale


def bench_epochs(n: int, repeats: int) -> str:
    images, labels = vgg_data(n)
    rows = ["| level | sparsity | dense fp32 (`off`) | ours fp32 (`auto`) | speed-up | layers sparse |"
            + (" dense bf16 (`--precision auto` here) | ours vs bf16 |" if native_bf16("cpu") else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if native_bf16("cpu") else "")]
    _, dense_epoch = vgg_epoch(images, labels, 0.0, "off", "fp32")
    outside, total = outside_products(dense_epoch)
    bound = f"outside the products: {fmt(outside)} of a {fmt(total)} dense epoch (profiled) → at most " \
            f"{total / outside:.1f}× from sparsity"
    print(bound, flush=True)
    for level, sparsity in [(0, 0.0), *LEVELS.items()]:
        _, dense = vgg_epoch(images, labels, sparsity, "off", "fp32")
        model, ours = vgg_epoch(images, labels, sparsity, "auto", "fp32")
        variants = [dense, ours]
        if native_bf16("cpu"):
            variants.append(vgg_epoch(images, labels, sparsity, "off", "bf16")[1])
        t_dense, t_ours, *t_bf16 = time_together(variants, repeats)
        paths = sparse_paths(model)
        row = (f"| {level} | {sparsity:.1%} | {fmt(t_dense)} | {fmt(t_ours)} | {t_dense / t_ours:.2f}× | "
               f"{sum(p == 'sparse' for p in paths.values())} of {len(paths)} |")
        if t_bf16:
            row += f" {fmt(t_bf16[0])} | {t_bf16[0] / t_ours:.2f}× |"
        rows.append(row)
        print(row, flush=True)
    floor = floors(images, labels, repeats)
    print(floor, flush=True)
    norms = norm_gain(images, labels, repeats)
    print(norms, flush=True)
    return "\n".join(rows) + f"\n\nThe bound: {bound}. {floor}\n\n{norms}"


def floors(images, labels, repeats: int) -> str:
    """What no sparsity of the products gets under, measured: the epoch with one weight kept per layer on the
    sparse path (`on`: the passes over the maps, BatchNorm, ReLU, pooling, the loss, the optimizer and the data,
    and next to no products), beside the dense epoch; and what BatchNorm and ReLU cost in both (each epoch
    again without them), timed in turn."""
    variants = [vgg_epoch(images, labels, 1.0, mode, "fp32", strip)[1]
                for mode in ("off", "on") for strip in (False, True)]
    dense, dense_bare, empty, empty_bare = time_together(variants, repeats)
    return (f"The floor of the sparse path: one weight kept per layer (`on`), {fmt(empty)} against {fmt(dense)} "
            f"dense ({dense / empty:.2f}×), so no sparsity of the products makes the epoch faster than that. "
            f"BatchNorm and ReLU take {fmt(dense - dense_bare)} of the dense epoch and {fmt(empty - empty_bare)} "
            f"of that floor (each epoch timed again without them: {fmt(dense_bare)} and {fmt(empty_bare)}, the "
            f"floor then {dense / empty_bare:.2f}× under the dense epoch).")


def norm_gain(images, labels, repeats: int) -> str:
    """What dsd2's BatchNorm2d with the ReLU before it fused in, and dsd2's max pool (the loop's), save against
    torch's BatchNorm2d, ReLU and MaxPool2d, in the dense epoch and at 96.5 % and 99.6 %, each pair timed in turn."""
    cases = [(0.0, "off"), (LEVELS[15], "auto"), (LEVELS[25], "auto")]
    variants = [vgg_epoch(images, labels, sparsity, mode, "fp32", torch_ops=torch_ops)[1]
                for sparsity, mode in cases for torch_ops in (True, False)]
    times = time_together(variants, repeats)
    parts = [f"{'dense' if not sparsity else f'{sparsity:.1%}'} {fmt(times[2 * i])} → {fmt(times[2 * i + 1])} "
             f"({times[2 * i] / times[2 * i + 1]:.2f}×)" for i, (sparsity, _) in enumerate(cases)]
    return ("The epoch with torch's BatchNorm2d, ReLU and MaxPool2d → with dsd2's BatchNorm2d, the ReLU before it "
            "fused in, and dsd2's MaxPool2d (`fuse_relu_batch_norms`, `swap_in_max_pools`: what the loop trains on), "
            "timed in turn: " + "; ".join(parts) + ".")


# ---- (c) inference of an exported model ----------------------------------------------------------------------

def exported(cfg: ModelConfig, shape, sparsity: float, folder: Path):
    """(the model load_compressed returns, the same model dense, file bytes, dense weights' bytes)."""
    from safetensors.torch import save

    model, masks = pruned(cfg, shape, sparsity)
    channels_last = cfg.name != "mlp"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dense = model.eval()
    masked, _ = swap_in_masked_layers(model, same_as=(Conv2d,))
    set_layer_masks(masked, masks)
    mean, std = torch.full((shape[0],), 120.0), torch.full((shape[0],), 60.0)
    data, _ = compressed_bytes(masked, cfg, shape, 10, mean, std, channels_last, {"benchmark": "bench_sparse"})
    path = folder / f"{cfg.name}.safetensors"
    path.write_bytes(data)
    loaded = dsd2.load_compressed(path)
    dense_bytes = len(save({k: v.contiguous() for k, v in dense.state_dict().items()}))

    def dense_call(images):
        x = (images.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return dense(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    return loaded, dense_call, len(data), dense_bytes


def layer_by_layer(loaded, images):
    """The loaded model with its feature stack off: each layer a call of its own (the way before SparseStack)."""
    mode, loaded.stack = loaded.stack, "off"
    try:
        return loaded(images)
    finally:
        loaded.stack = mode


def bench_inference(repeats: int) -> str:
    rows = ["| model | sparsity | file | dense weights | batch | dense | ours, layer by layer | ours (`auto`) | "
            "way taken | layers sparse | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for cfg, shape, name in [(ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32), "VGG-like d=5 g=5"),
                                 (ModelConfig(name="mlp"), (1, 8, 8), "digits MLP 64-256-256-10")]:
            loaded, dense_call, size, dense_size = exported(cfg, shape, LEVELS[20], Path(folder))
            for batch in (1, 128):
                images = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
                with torch.no_grad():
                    torch.testing.assert_close(loaded(images), dense_call(images), rtol=1e-4, atol=1e-4)
                    t_dense, t_layers, t_ours = time_together(
                        [lambda f=dense_call, x=images: f(x), lambda m=loaded, x=images: layer_by_layer(m, x),
                         lambda f=loaded, x=images: f(x)], repeats * 10)
                    loaded(images)
                paths = sparse_paths(loaded.net)
                rows.append(f"| {name} | {LEVELS[20]:.1%} | {size / 2**10:.1f} KiB | {dense_size / 2**10:.1f} KiB "
                            f"({dense_size / size:.1f}×) | {batch} | {fmt(t_dense)} | {fmt(t_layers)} | "
                            f"{fmt(t_ours)} | {loaded.inference_path} | "
                            f"{sum(p == 'sparse' for p in paths.values())} of {len(paths)} | "
                            f"{t_dense / t_ours:.2f}× |")
                print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shapes and images; prints only")
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run, e.g. bc (default abc; "
                        "RESULTS.md is written only for all three)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    print(machine(), flush=True)
    started = time.perf_counter()
    a = bench_layers(args.quick, repeats) if "a" in args.parts else "not run"
    b = bench_epochs(256 if args.quick else 1024, 1 if args.quick else 5) if "b" in args.parts else "not run"
    c = bench_inference(repeats) if "c" in args.parts else "not run"
    took = time.perf_counter() - started
    body = (f"Machine: {machine()}. `python benchmarks/bench_sparse.py`, {took / 60:.1f} min.\n\n"
            f"**(a) One layer, forward + backward** (median of {repeats}; in brackets the dense masked layer's time "
            "over ours):\n\n" + a +
            "\n\n**(b) A VGG-like training epoch** (1,024 synthetic CIFAR images, batch 128; median of 5, the "
            "columns timed in turn):\n\n" + b +
            f"\n\n**(c) Inference** (median of {repeats * 10}):\n\n" + c)
    if args.quick or args.parts != "abc":
        print(body)
    else:
        write_block("bench_sparse", "Sparse kernels (bench_sparse.py)", body)


if __name__ == "__main__":
    main()
