"""The digits MLP's training epoch on the CPU at 1 and 2 threads: dsd2's fused epoch against its eager epoch and
against the loops a user would write instead, all in one run, with the epoch's arithmetic floor.

The case, the loops and the floor are bench_engine.py's (the embedded default's MLP, 80 % masked, Adam, batch 64),
here at each thread count in turn, and with the engine's eager epoch (`--cpu-step eager`) beside the fused one:

- ours, fused: the engine's executor as `dsd2-engine train` picks it (`--cpu-step auto`): one C++ call per epoch;
- ours, eager: the same executor with `--cpu-step eager` (masked layers, MaskedAdam, Python per step);
- (b) plain eager loop and (c) that loop under torch.compile, as in bench_engine.py;
- floor: the epoch's multiply-adds at the 1024^3 fp32 GEMM rate this machine measures at the same thread count.

    python benchmarks/bench_cpu_step.py            # median of 20 epochs per row after a warm-up one; the table
                                                   # goes into benchmarks/RESULTS.md
    python benchmarks/bench_cpu_step.py --no-compile
"""

from __future__ import annotations

import argparse

import torch
from bench_engine import cases, epoch_macs, gemm_rate, machine, ours, plain_loop, time_it  # benchmarks/
from results_file import write_block

from dsd2.ops import cpu_isa

EPOCHS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    mlp = cases(quick=True)[0]
    threads_before = torch.get_num_threads()
    table = ["| threads | ours, fused | ours, eager | plain eager loop (b) | (b) under torch.compile (c) | floor | "
             "fused vs eager | fused vs (b) | fused vs (c) | fused / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        mode, fused = ours(mlp)
        assert mode == "fused-cpu", mode
        t_fused = time_it(fused, EPOCHS)
        t_eager = time_it(ours(mlp, cpu_step="eager")[1], EPOCHS)
        t_plain = time_it(plain_loop(mlp, compiled=False), EPOCHS)
        t_comp = None if args.no_compile else time_it(plain_loop(mlp, compiled=True), EPOCHS)
        floor = epoch_macs(mlp) / gemm_rate()
        comp = f"{t_comp * 1e3:.1f} ms" if t_comp else "not run"
        vs_comp = f"{t_comp / t_fused:.2f}×" if t_comp else "–"
        table.append(f"| {threads} | {t_fused * 1e3:.1f} ms | {t_eager * 1e3:.1f} ms | {t_plain * 1e3:.1f} ms | {comp} "
                     f"| {floor * 1e3:.1f} ms | {t_eager / t_fused:.2f}× | {t_plain / t_fused:.2f}× | {vs_comp} | "
                     f"{t_fused / floor:.1f}× |")
    text = "\n".join(table)
    torch.set_num_threads(threads_before)
    print(machine())
    print(text)
    write_block(f"bench_cpu_step-{cpu_isa()}", f"CPU step: the digits MLP's epoch, dsd2 kernels at {cpu_isa()}",
                f"Machine: {machine()} (thread count per row).\nCommand: `python benchmarks/bench_cpu_step.py` (median "
                f"of {EPOCHS} epochs per row after a warm-up one; every row in this one run).\n\n{text}")


if __name__ == "__main__":
    main()
