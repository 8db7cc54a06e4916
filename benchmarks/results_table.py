"""Turn a pytest-benchmark JSON of bench_ops.py into the ops table of benchmarks/RESULTS.md.

    python benchmarks/results_table.py benchmarks/ops.json [--no-write]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from results_file import write_block  # benchmarks/, on the path of a script run from it


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-2 else f"{seconds * 1e3:.1f} ms"


def build(data: dict) -> str:
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
    lines = [f"Machine: {cpu}, {m.get('cpu', {}).get('count', '?')} logical CPUs, python {m.get('python_version')}; "
             f"measured copy bandwidth {copy_bw / 1e9:.1f} GB/s." if copy_bw else f"Machine: {cpu}.", "",
             "| op | size | ours | eager | compile | other | eager / ours | compile / ours | ours GB/s (% of copy) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (op, size), v in rows.items():
        ours = v.get("ours")
        if ours is None:
            continue
        others = {k: t for k, t in v.items() if k not in ("ours", "eager", "compile")}
        eager, comp = v.get("eager"), v.get("compile")
        if eager is None and "prune-hooks" in others:
            eager = others.pop("prune-hooks")
            op = f"{op} (eager = prune hooks)"
        other = ", ".join(f"{k} {fmt_time(t[0])} ({t[0] / ours[0]:.2f}x)" for k, t in others.items()) or "-"
        bw = ""
        if ours[1] and copy_bw:
            gbs = ours[1] / ours[0]
            bw = f"{gbs / 1e9:.1f} ({100 * gbs / copy_bw:.0f} %)"
        lines.append(
            f"| {op} | {size} | {fmt_time(ours[0])} | {fmt_time(eager[0]) if eager else '-'} | "
            f"{fmt_time(comp[0]) if comp else '-'} | {other} | "
            f"{f'**{eager[0] / ours[0]:.2f}x**' if eager else '-'} | "
            f"{f'**{comp[0] / ours[0]:.2f}x**' if comp else '-'} | {bw or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    table = build(json.loads(Path(args.json).read_text()))
    print(table)
    if args.no_write:
        return
    write_block("bench_ops", "Fused ops",
                "Command: `pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-json=ops.json && "
                f"python benchmarks/results_table.py ops.json` (medians).\n\n{table}")


if __name__ == "__main__":
    main()
