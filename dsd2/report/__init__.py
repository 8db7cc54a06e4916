"""Figures and tables from run directories: accuracy vs sparsity over seeds, as PNG/SVG, Markdown and CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dsd2.analysis.curves import aggregate, dip_report
from dsd2.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text


def load_runs(paths: list[str | Path]) -> list[list[dict[str, Any]]]:
    runs = []
    for p in paths:
        rows = RunDir(p).levels()
        if not rows:
            raise RunError(f"'{p}' holds no completed level (no metrics.jsonl rows)")
        runs.append(rows)
    return runs


def curve_table(runs: list[list[dict[str, Any]]]) -> tuple[str, str]:
    """Markdown and CSV of mean ± std per level over the given runs."""
    test, val, train = aggregate(runs, "test_acc"), aggregate(runs, "val_acc"), aggregate(runs, "train_acc")
    header = ["level", "sparsity", "train_acc", "val_acc", "test_acc", "test_std", "seeds"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for t, v, tr in zip(test, val, train):
        cells = [t.level, f"{t.sparsity:.4f}", f"{tr.mean:.3f}", f"{v.mean:.3f}", f"{t.mean:.3f}",
                 f"{t.std:.3f}", t.n]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        writer.writerow(cells)
    d = dip_report([p.mean for p in test])
    lines.append("")
    lines.append(f"Dense {d.dense:.3f}; critical minimum {d.critical:.3f} at level {d.critical_level} "
                 f"(dip {d.dip * 100:.1f} points below {d.peak_before_dip:.3f}); sweet maximum {d.sweet:.3f} at "
                 f"level {d.sweet_level} (rise {d.rise * 100:.1f} points); last level {d.final:.3f}.")
    return "\n".join(lines) + "\n", buf.getvalue()


def plot_curves(groups: dict[str, list[list[dict[str, Any]]]], path_stem: Path, title: str = "") -> list[Path]:
    """Test accuracy vs remaining weights (log scale, sparser to the right), mean ± std band per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in groups.items():
        pts = aggregate(runs, "test_acc")
        x = [max(1 - p.sparsity, 1e-6) * 100 for p in pts]
        y = [p.mean * 100 for p in pts]
        s = [p.std * 100 for p in pts]
        ax.plot(x, y, marker="o", ms=3, label=f"{label} (n={pts[0].n})")
        ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.2)
        val = aggregate(runs, "val_acc")
        best = max(range(len(val)), key=lambda i: (val[i].mean, val[i].sparsity))
        ax.plot([x[best]], [y[best]], marker="*", ms=14, color="gold", markeredgecolor="k", zorder=5)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("remaining weights (%)  [log scale; sparser to the right]")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    written = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120)
        out = path_stem.with_suffix(f".{ext}")
        atomic_write_bytes(out, buf.getvalue())
        written.append(out)
    plt.close(fig)
    return written


def write_report(run_paths: list[str | Path], out: Path, title: str = "") -> list[Path]:
    runs = load_runs(run_paths)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = curve_table(runs)
    atomic_write_text(out / "curve.md", md)
    atomic_write_text(out / "curve.csv", csv_text)
    figures = plot_curves({title or "test accuracy": runs}, out / "curve", title)
    return [out / "curve.md", out / "curve.csv", *figures]
