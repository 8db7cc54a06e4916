"""Turn a pytest-benchmark JSON of benchmarks/ops/ into the ops table of benchmarks/RESULTS.md.

    python benchmarks/results_table.py benchmarks/ops.json [--no-write]
    python benchmarks/results_table.py bn.json --only bench_batch_norm.py   # one file's run, in a block of its own
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from results_file import write_block  # benchmarks/, on the path of a script run from it


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-2 else f"{seconds * 1e3:.1f} ms"


def build(data: dict, levels: str = "") -> str:
    """One row per op, size and CPU level of our kernels; eager, torch.compile and the others repeat per row."""
    rows = defaultdict(dict)
    copy_bw = None
    for b in data["benchmarks"]:
        info = b["extra_info"]
        median = b["stats"]["median"]
        if info["op"] == "copy":
            copy_bw = info["bytes"] / median
            continue
        rows[(info["op"], info["size"])][info["variant"]] = (median, info["bytes"])
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    flags = set(m.get("cpu", {}).get("flags", []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2 + FMA" if "avx2" in flags else "x86-64 baseline"
    machine = (f"Machine: {cpu} ({isa}{'; ' + levels if levels else ''}), {m.get('cpu', {}).get('count', '?')} "
               f"logical CPUs, python {m.get('python_version')}")
    lines = [machine + (f"; measured copy bandwidth {copy_bw / 1e9:.1f} GB/s." if copy_bw else "."), "",
             "| op | size | our kernels' level | ours | eager | compile | other | eager / ours | compile / ours | "
             "ours GB/s (% of copy) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, size), v in rows.items():
        ours_levels = {k.partition("@")[2] or "best": t for k, t in v.items() if k.startswith("ours")}
        others = {k: t for k, t in v.items() if not k.startswith("ours") and k not in ("eager", "compile")}
        eager, comp = v.get("eager"), v.get("compile")
        if eager is None and "prune-hooks" in others:
            eager = others.pop("prune-hooks")
            op = f"{op} (eager = prune hooks)"
        for level, ours in ours_levels.items():
            other = ", ".join(f"{k} {fmt_time(t[0])} (ours = {ours[0] / t[0]:.1f}x it)" if k == "exp floor" else
                              f"{k} {fmt_time(t[0])} ({t[0] / ours[0]:.2f}x)" for k, t in others.items()) or "-"
            bw = ""
            if ours[1] and copy_bw:
                gbs = ours[1] / ours[0]
                bw = f"{gbs / 1e9:.1f} ({100 * gbs / copy_bw:.0f} %)"
            lines.append(
                f"| {op} | {size} | {level} | {fmt_time(ours[0])} | {fmt_time(eager[0]) if eager else '-'} | "
                f"{fmt_time(comp[0]) if comp else '-'} | {other} | "
                f"{f'**{eager[0] / ours[0]:.2f}x**' if eager else '-'} | "
                f"{f'**{comp[0] / ours[0]:.2f}x**' if comp else '-'} | {bw or '-'} |"
            )
    lines += ["", "`exp floor`: torch.exp (ATen's vectorised exp at its best level, same threads) over a tensor of the "
              "3 x B x C exponentials that the KD loss needs: the cost of those exponentials alone, memory traffic "
              "included; `ours = Nx it` is our whole forward + backward as a multiple of it. Eager and torch.compile "
              "run at ATen's best level in every row. Other columns: their time and its ratio to ours."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--only", metavar="FILE", help="the JSON is a run of this one file of benchmarks/ops: its "
                        "table goes to a block of its own, leaving the whole suite's table as it is")
    args = parser.parse_args()
    from dsd2.ops import cpu_isa_levels

    table = build(json.loads(Path(args.json).read_text()), "our kernels run at: " + ", ".join(cpu_isa_levels()))
    print(table)
    if args.no_write:
        return
    if args.only:
        name = Path(args.only).stem
        write_block(name, f"Fused ops: {name}.py", f"Command: `pytest benchmarks/ops/{name}.py --benchmark-enable "
                    f"--benchmark-json={name}.json && python benchmarks/results_table.py {name}.json --only "
                    f"{name}.py` (medians).\n\n{table}")
        return
    write_block("bench_ops", "Fused ops",
                "Command: `pytest benchmarks/ops --benchmark-enable --benchmark-json=ops.json && "
                f"python benchmarks/results_table.py ops.json` (medians).\n\n{table}")

if __name__ == "__main__":
    main()
