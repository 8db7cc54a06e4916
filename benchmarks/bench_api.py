"""The Python API against the CLI on the digits default (no students): the same loop, so the same time is expected;
this measures what the API adds (turning the user's tensors into the on-device splits, fingerprinting the model and
the data) in one process, the two paths alternating.

    python benchmarks/bench_api.py              # the full default curve (28 levels), twice each; writes RESULTS.md
    python benchmarks/bench_api.py --levels 4   # a shorter curve, printed only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_file import write_block  # benchmarks/, on the path of a script run from it

import dsd2
from dsd2.cli import main as cli_main
from dsd2.config import ModelConfig, build_config
from dsd2.data.sources import load_digits_dataset
from dsd2.models import build_model
from dsd2.ops import cpu_isa, cpu_model


def cli_run(out: Path, levels: list[str]) -> float:
    t0 = time.perf_counter()
    assert cli_main(["train", "--students", "none", *levels, "--out", str(out), "--quiet"]) == 0
    return time.perf_counter() - t0


def api_run(out: Path, levels: list[str]) -> float:
    """The same curve through dsd2.prune: the digits tensors, an MLP 64-256-256-10, the default settings (noise
    0.5 as in the CLI's default; the API's own default is no noise)."""
    raw = load_digits_dataset()
    cfg = build_config(None, None, {})
    config = {"data": {"noise": cfg.data.noise, "val_fraction": cfg.data.val_fraction}}
    if levels:
        config["prune"] = {"levels": int(levels[1])}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), tuple(raw.train_images.shape[1:]), 10)
    dsd2.prune(model, (raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels), out=out,
               config=config, log=lambda s: None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=None, help="a shorter curve (printed only)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    levels = [] if args.levels is None else ["--levels", str(args.levels)]
    times: dict[str, list[float]] = {"cli": [], "api": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            times["cli"].append(cli_run(Path(tmp) / f"cli{i}", levels))
            times["api"].append(api_run(Path(tmp) / f"api{i}", levels))
    cli, api = statistics.median(times["cli"]), statistics.median(times["api"])
    machine = (f"{cpu_model()}, {torch.get_num_threads()} threads, dsd2 kernels at {cpu_isa()}, "
               f"torch {torch.__version__}")
    runs = {k: ", ".join(f"{t:.1f}" for t in v) for k, v in times.items()}
    text = (f"| path | wall time of the curve (s, median of {args.repeats}) | runs (s) |\n|---|---|---|\n"
            f"| CLI: `dsd2-engine train --students none` | {cli:.1f} | {runs['cli']} |\n"
            f"| API: `dsd2.prune(mlp, digits tensors)` | {api:.1f} | {runs['api']} |\n"
            f"\nAPI / CLI: **{api / cli:.3f}**")
    print(machine)
    print(text)
    if args.levels is None:
        write_block("bench_api", "Python API against the CLI, digits default",
                    f"Machine: {machine}.\nCommand: `python benchmarks/bench_api.py` (the two paths alternate in one "
                    f"process).\n\n{text}")


if __name__ == "__main__":
    main()
