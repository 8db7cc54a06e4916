"""Figures and tables from run directories: the paper's Fig. 2 (accuracy vs sparsity, phases, w_best, entropy),
comparisons of several configurations on one panel (Fig. 4: depth/width; Fig. 5: students), curve tables and
a Table 1 analogue (training FLOPs and accuracy of the full loop and of early-stopped loops).

Runs whose configs differ only in the seed form one group and aggregate to mean ± std.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsd2.analysis.curves import aggregate, dip_report
from dsd2.analysis.early_stop import decide
from dsd2.analysis.phases import detect_phases
from dsd2.analysis.stats import t975
from dsd2.report.units import format_dip, format_pflops
from dsd2.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text

PHASE_COLOURS = {"light": "#e8f4e8", "critical": "#fbe3e3", "sweet": "#e3ecfb", "collapsed": "#eeeeee"}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None


def load_run(path: str | Path) -> Run:
    rd = RunDir(path)
    rows = rd.levels()
    if not rows:
        raise RunError(f"'{path}' holds no completed level (no metrics.jsonl rows)")
    stored = rd.stored_config() if rd.config_path.exists() else None
    return Run(Path(path), stored["config"] if stored else {}, rows, rd.summary())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


# what does not tell configurations apart: where things live, and the teacher run's hash (it differs with the
# teacher's seed); the teacher level a student was distilled from is kept
IGNORED_FOR_GROUPING = {"seed", "device", "data.data_root", "data.download", "distill.teacher"}


def _grouping_view(flat: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in flat.items() if k not in IGNORED_FOR_GROUPING}
    if out.get("distill.teacher_id"):
        out["distill.teacher_id"] = "level " + str(out["distill.teacher_id"]).rsplit(":", 1)[-1]
    return out


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs that differ only by seed; label groups by the config fields that differ between them."""
    flats = [_grouping_view(_flatten(r.config)) for r in runs]
    keys = sorted({k for f in flats for k in f})
    signature = [tuple((k, f.get(k)) for k in keys) for f in flats]
    distinct = sorted(set(signature), key=signature.index)
    varying = [k for k in keys if len({dict(sig).get(k) for sig in distinct}) > 1]
    groups: dict[str, list[Run]] = {}
    for run, sig in zip(runs, signature):
        d = dict(sig)
        if varying:
            label = ", ".join(f"{k.split('.')[-1]}={d.get(k)}" for k in varying)
        else:
            label = f"{d.get('data.dataset', '?')} {d.get('model.name', '?')} noise={d.get('data.noise', '?')}"
        groups.setdefault(label, []).append(run)
    return groups


def _curves(runs: list[Run], key: str) -> list[list[float]]:
    return [[r[key] for r in run.rows] for run in runs]


def curve_table(rows_per_run: list[list[dict[str, Any]]]) -> tuple[str, str]:
    """Markdown and CSV of mean ± std per level over the given runs (seeds of one configuration)."""
    test, val, train = (aggregate(rows_per_run, k) for k in ("test_acc", "val_acc", "train_acc"))
    has_entropy = all("entropy_mean" in r for rows in rows_per_run for r in rows)
    ent = aggregate(rows_per_run, "entropy_mean") if has_entropy else None
    header = ["level", "sparsity", "train_acc", "val_acc", "test_acc", "test_std", "test_ci95", "seeds"]
    if ent:
        header.append("entropy_bits")
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for i, (t, v, tr) in enumerate(zip(test, val, train)):
        half = ci_half_width(t)
        ci = f"[{max(t.mean - half, 0.0):.3f}, {min(t.mean + half, 1.0):.3f}]" if t.n > 1 else ""
        cells = [t.level, f"{t.sparsity:.4f}", f"{tr.mean:.3f}", f"{v.mean:.3f}", f"{t.mean:.3f}", f"{t.std:.3f}", ci,
                 t.n]
        if ent:
            cells.append(f"{ent[i].mean:.4f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        writer.writerow(cells)
    d = dip_report([p.mean for p in test])
    lines.append("")
    lines.append(f"Dense {d.dense:.3f}; critical minimum {d.critical:.3f} at level {d.critical_level} "
                 f"(dip {d.dip * 100:.1f} points below {d.peak_before_dip:.3f}); sweet maximum {d.sweet:.3f} at "
                 f"level {d.sweet_level} (rise {d.rise * 100:.1f} points); last level {d.final:.3f}.")
    return "\n".join(lines) + "\n", buf.getvalue()


def _save(fig, stem: Path) -> list[Path]:
    written = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120)
        out = stem.with_suffix(f".{ext}")
        atomic_write_bytes(out, buf.getvalue())
        written.append(out)
    return written


def ci_half_width(p) -> float:
    """Half the 95 % t-interval of a curve point's mean over its seeds (0 with one seed)."""
    return t975(p.n - 1) * p.std / p.n**0.5 if p.n > 1 else 0.0


def _mean_band(ax, pts, scale: float, **style) -> tuple[list[float], list[float], list[float]]:
    """Plot the mean of each point against the remaining weights (%) with its 95 % band; returns x, mean and the
    band's half width, times `scale`."""
    x = [max(1 - p.sparsity, 1e-6) * 100 for p in pts]
    y, half = [p.mean * scale for p in pts], [ci_half_width(p) * scale for p in pts]
    (line,) = ax.plot(x, y, **style)
    ax.fill_between(x, [a - h for a, h in zip(y, half)], [a + h for a, h in zip(y, half)], alpha=0.2,
                    color=line.get_color())
    return x, y, half


def _plot_group(ax, label: str, runs: list[Run], *, shade: bool) -> dict[str, Any]:
    rows = [r.rows for r in runs]
    pts = aggregate(rows, "test_acc")
    band = " ± 95 % CI" if pts[0].n > 1 else ""
    x, y, half = _mean_band(ax, pts, 100, marker="o", ms=3, label=f"{label} (n={pts[0].n}{band})")
    s = [p.std * 100 for p in pts]
    val = aggregate(rows, "val_acc")
    best = max(range(len(val)), key=lambda i: (val[i].mean, val[i].sparsity))
    ax.plot([x[best]], [y[best]], marker="*", ms=15, color="gold", markeredgecolor="k", zorder=5)
    data = {"label": label, "levels": [p.level for p in pts], "remaining_pct": x, "test_acc_pct": y,
            "test_std_pct": s, "test_ci95_half_pct": half, "best_level": pts[best].level,
            "runs": [str(r.path) for r in runs]}
    if shade:
        phases = detect_phases(_curves(runs, "test_acc") if len(runs) > 1 else [p.mean for p in pts])
        bounds = [x[0] * 1.15] + [(x[i] * x[i + 1]) ** 0.5 for i in range(len(x) - 1)] + [x[-1] / 1.15]
        for i, name in enumerate(phases.labels):
            ax.axvspan(bounds[i], bounds[i + 1], color=PHASE_COLOURS[name], zorder=0, lw=0)
        data["phases"] = phases.labels
        data["phase_summary"] = phases.describe()
    return data


def figure_sparsity(groups: dict[str, list[Run]], stem: Path, title: str = "", shade: bool = True,
                    entropy: bool = True) -> tuple[list[Path], dict[str, Any]]:
    """Fig. 2 (one group: phases shaded, entropy on a second axis) or a comparison panel (several groups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    distances = all("dist_from_init" in r for runs in groups.values() for run in runs for r in run.rows)
    if distances:
        fig, (ax, dax) = plt.subplots(2, 1, figsize=(7.5, 6.2), sharex=True, height_ratios=(3, 1.4))
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
    plotted = {"groups": []}
    for label, runs in groups.items():
        plotted["groups"].append(_plot_group(ax, label, runs, shade=shade and len(groups) == 1))
    ax.set_xscale("log")
    ax.invert_xaxis()
    if distances:
        plotted["dist_from_init"] = _plot_distances(dax, groups)
    (dax if distances else ax).set_xlabel("remaining weights (%)  [log scale; sparser to the right]")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    handles, _ = ax.get_legend_handles_labels()
    if shade and len(groups) == 1:
        handles += [Patch(color=c, label=n) for n, c in PHASE_COLOURS.items()]
    if entropy and len(groups) == 1:
        runs = next(iter(groups.values()))
        if all("entropy_mean" in r for run in runs for r in run.rows):
            ent = aggregate([r.rows for r in runs], "entropy_mean")
            ax2 = ax.twinx()
            x = [max(1 - p.sparsity, 1e-6) * 100 for p in ent]
            (eline,) = ax2.plot(x, [p.mean for p in ent], color="purple", ls="--", marker=".", label="ReLU-state "
                                "entropy (bits, mean over layers)")
            ax2.set_ylabel("entropy (bits)", color="purple")
            handles.append(eline)
            plotted["entropy"] = {"remaining_pct": x, "entropy_bits": [p.mean for p in ent]}
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    written = _save(fig, stem)
    plt.close(fig)
    return written, plotted


def _plot_distances(ax, groups: dict[str, list[Run]]) -> dict[str, Any]:
    """He et al.'s reading beside the accuracy: the l2 distance of each level's retained weights from the
    initial ones (mean over seeds, 95 % band)."""
    out = {}
    for label, runs in groups.items():
        x, y, half = _mean_band(ax, aggregate([r.rows for r in runs], "dist_from_init"), 1, marker=".", ms=3)
        out[label] = {"remaining_pct": x, "dist_from_init": y, "ci95_half": half}
    ax.set_ylabel("l2 distance\nfrom init")
    ax.grid(alpha=0.3, which="both")
    return out


def simulate_early_stop(rows: list[dict[str, Any]], rule: str, patience: int, tolerance: float) -> int:
    """The level at which the engine's rule would stop on this recorded curve (the last level if never)."""
    for i in range(1, len(rows) + 1):
        prefix = rows[:i]
        ents = [r.get("entropy_mean", float("nan")) for r in prefix]
        if decide(rule, [r["val_acc"] for r in prefix], ents, patience=patience, tolerance=tolerance).stop:
            return i - 1
    return len(rows) - 1


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0] * 100:.2f}"
    return f"{statistics.fmean(values) * 100:.2f} ± {statistics.stdev(values) * 100:.2f}"


def _rule_settings(run: Run) -> tuple[int, float]:
    a = run.config.get("analysis", {}) if run.config else {}
    return int(a.get("patience", 3)), float(a.get("entropy_tolerance", 0.05))


# Table 1's columns: the Markdown header shows costs with a readable unit per cell (`format_pflops`), the CSV keeps
# the exact numbers in PFLOPs
TABLE1_MD_HEADER = ["configuration", "loop", "train FLOPs (dense, 1/MAC)", "teacher inference FLOPs",
                    "teacher training FLOPs", "test acc (%)", "sparsity (%)", "levels run", "seeds"]
TABLE1_CSV_HEADER = ["configuration", "loop", "train PFLOPs (dense, 1/MAC)", "teacher inference PFLOPs",
                     "teacher training PFLOPs", "test acc (%)", "sparsity (%)", "levels run", "seeds"]


def _loop_outcome(runs: list[Run], rule: str | None) -> dict[str, list[float]]:
    """Per run: training and teacher-inference PFLOPs, test accuracy and sparsity of the returned model, and the
    levels run, for the loop as run (`rule` None) or as the early-stop rule would have stopped it."""
    out: dict[str, list[float]] = {"pflops": [], "teacher": [], "accs": [], "sparsities": [], "levels": []}
    for run in runs:
        patience, tolerance = _rule_settings(run)
        stop = len(run.rows) - 1 if rule is None else simulate_early_stop(run.rows, rule, patience, tolerance)
        done = run.rows[: stop + 1]
        best = max(done, key=lambda r: (r["val_acc"], r["sparsity"]))
        out["pflops"].append(sum(r.get("train_flops_dense", 0.0) for r in done) / 1e15)
        out["teacher"].append(sum(r.get("teacher_flops", 0.0) for r in done) / 1e15)
        out["accs"].append(best["test_acc"])
        out["sparsities"].append(best["sparsity"])
        out["levels"].append(len(done))
    return out


def table1(groups: dict[str, list[Run]], teacher_training: dict[str, list[float]] | None = None
           ) -> tuple[str, str]:
    """Training cost (dense, fvcore convention) and test accuracy of the returned model (w_best by
    validation) for the full loop and the loops the early-stop rules would have run. The teacher columns
    hold the teacher's forward passes during distillation and, when given (in PFLOPs), the cost of training the
    teacher up to the level it was taken from (the paper's "+ teacher"). Markdown shows costs in a readable
    unit; the CSV holds them exactly, in PFLOPs."""
    teacher_training = teacher_training or {}
    lines = [f"| {' | '.join(TABLE1_MD_HEADER)} |", f"|{'---|' * len(TABLE1_MD_HEADER)}"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(TABLE1_CSV_HEADER)
    for label, runs in groups.items():
        stopped = any((r.summary or {}).get("early_stop", {}).get("stopped") for r in runs)
        rules = [("loop as run (stopped early)" if stopped else "full loop", None)]
        if all("entropy_mean" in r for run in runs for r in run.rows):
            rules.append(("early stop: entropy", "entropy"))
        rules.append(("early stop: validation", "val"))
        for name, rule in rules:
            o = _loop_outcome(runs, rule)
            costs = [statistics.fmean(o["pflops"]), statistics.fmean(o["teacher"]),
                     statistics.fmean(teacher_training.get(label) or [0.0])]
            rest = [_mean_std(o["accs"]), f"{statistics.fmean(o['sparsities']) * 100:.2f}",
                    f"{statistics.fmean(o['levels']):g}", len(runs)]
            lines.append("| " + " | ".join(str(c) for c in [label, name, *map(format_pflops, costs), *rest]) + " |")
            writer.writerow([label, name, *costs, *rest])
    return "\n".join(lines) + "\n", buf.getvalue()


def write_experiment_report(roots: str | Path | list[str | Path], out: Path) -> list[Path]:
    """Report of one or several DSD² experiment directories (seeds aggregate): the teacher's Fig. 2, the
    students on one panel (Fig. 5), a curve table per curve and one Table 1 with the teacher and students."""
    roots = [Path(r) for r in (roots if isinstance(roots, list) else [roots])]
    configs = [_grouping_view(_flatten(RunDir(r).stored_config()["config"])) if RunDir(r).config_path.exists()
               else {} for r in roots]
    differing = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    if differing:
        raise RunError(f"the experiments differ in {', '.join(differing)}, not only in the seed; report them one "
                       "at a time")
    teachers = [load_run(r / "teacher") for r in roots]
    kinds = sorted({p.name for r in roots if (r / "students").is_dir() for p in (r / "students").iterdir()
                    if (p / "metrics.jsonl").exists()})
    students = {k: [load_run(r / "students" / k) for r in roots if (r / "students" / k / "metrics.jsonl").exists()]
                for k in kinds}
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figure_data: dict[str, Any] = {}
    paths, data = figure_sparsity({"teacher": teachers}, out / "fig2_teacher", "teacher")
    written += paths
    figure_data["fig2_teacher"] = data
    labels = {"vanilla": "student, vanilla", "kd-dense": "student, KD from the dense teacher",
              "kd-sparse": "student, KD from the selected sparse teacher"}
    groups = {labels.get(k, k): runs for k, runs in students.items()}
    if groups:
        paths, data = figure_sparsity(groups, out / "fig5_students", "students", shade=False, entropy=False)
        written += paths
        figure_data["fig5_students"] = data
    for name, group in [("teacher", teachers), *students.items()]:
        md, csv_text = curve_table([r.rows for r in group])
        atomic_write_text(out / f"curve_{name}.md", f"# {name}\n\n{md}")
        atomic_write_text(out / f"curve_{name}.csv", csv_text)
        written += [out / f"curve_{name}.md", out / f"curve_{name}.csv"]
    # the teacher's own training cost, up to the level each student was distilled from
    selected = [json.loads((r / "summary.json").read_text())["teacher"]["selected_level"]
                if (r / "summary.json").exists() else None for r in roots]
    cost = {}
    for kind, upto in (("kd-dense", lambda level: 0), ("kd-sparse", lambda level: level)):
        if kind in students and all(level is not None for level in selected):
            cost[labels[kind]] = [
                sum(row.get("train_flops_dense", 0.0) for row in t.rows if row["level"] <= upto(lv)) / 1e15
                for t, lv in zip(teachers, selected)
            ]
    md, csv_text = table1({"teacher": teachers, **groups}, teacher_training=cost)
    atomic_write_text(out / "table1.md", md)
    atomic_write_text(out / "table1.csv", csv_text)
    atomic_write_text(out / "figure_data.json", json.dumps(figure_data, indent=1))
    return written + [out / "table1.md", out / "table1.csv", out / "figure_data.json"]


def write_report(run_paths: list[str | Path], out: Path, title: str = "") -> list[Path]:
    runs = [load_run(p) for p in run_paths]
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figure_data: dict[str, Any] = {}
    for i, (label, members) in enumerate(groups.items()):
        suffix = "" if len(groups) == 1 else f"_{i}"
        md, csv_text = curve_table([r.rows for r in members])
        atomic_write_text(out / f"curve{suffix}.md", f"# {label}\n\n{md}")
        atomic_write_text(out / f"curve{suffix}.csv", csv_text)
        written += [out / f"curve{suffix}.md", out / f"curve{suffix}.csv"]
        paths, data = figure_sparsity({label: members}, out / f"fig2{suffix}", title or label)
        written += paths
        figure_data[f"fig2{suffix}"] = data
    if len(groups) > 1:
        paths, data = figure_sparsity(groups, out / "compare", title or "comparison", shade=False, entropy=False)
        written += paths
        figure_data["compare"] = data
    md, csv_text = table1(groups)
    atomic_write_text(out / "table1.md", md)
    atomic_write_text(out / "table1.csv", csv_text)
    atomic_write_text(out / "figure_data.json", json.dumps(figure_data, indent=1))
    written += [out / "table1.md", out / "table1.csv", out / "figure_data.json"]
    return written


# ---- a configuration run over seeds (train --seeds) -----------------------------------------------------------------

SEEDS_HEADER = ["curve", "seeds", "dense test acc (%)", "w_best test acc (%)", "w_best sparsity (%)",
                "dip (points) [95 % CI]", "verdict"]


def _pct(stat: dict[str, Any]) -> str:
    """'82.10 ± 4.30 [71.4, 92.8]' from a `mean_ci` dict (one seed: the value alone)."""
    if stat["std"] is None:
        return f"{stat['mean'] * 100:.2f}"
    lo, hi = stat["ci95"]
    return f"{stat['mean'] * 100:.2f} ± {stat['std'] * 100:.2f} [{lo * 100:.1f}, {hi * 100:.1f}]"


def seeds_table(summary: dict[str, Any]) -> str:
    """Markdown table of a seeds summary: per curve the headline numbers (mean ± std [95 % CI]), the dip with its
    simultaneous bootstrap interval and the verdict; the verdicts' notes below it."""
    lines = [f"| {' | '.join(SEEDS_HEADER)} |", f"|{'---|' * len(SEEDS_HEADER)}"]
    notes = []
    order = ["teacher", "run", "vanilla", "kd-dense", "kd-sparse"]  # the experiment's order, then any other
    for name, c in sorted(summary["curves"].items(), key=lambda kv: (order + [kv[0]]).index(kv[0])):
        h, v = c["headline"], c["verdict"]
        dip = format_dip(v.get("dip"), v.get("lower"), v.get("upper"))
        cells = [name, c["seeds"], _pct(h["dense_test_acc"]), _pct(h["best_test_acc"]), _pct(h["best_sparsity"]),
                 dip, v["verdict"] or "none"]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
        if v.get("note") or v["verdict"] is None:
            notes.append(f"- {name}: {v.get('note') or v['describe']}")
    margin = summary.get("dodge_margin", 0.01) * 100
    lines += ["", f"Dip: the deepest valley of the mean curve, min(drop from dense to the critical level, climb from "
              f"there to the sweet peak); SDD present if its 95 % lower bound is above 0, dodged if its upper bound "
              f"is below {margin:g} point(s)."] + notes
    return "\n".join(lines) + "\n"


def write_seeds_report(root: str | Path, out: Path) -> list[Path]:
    """Report of a configuration run over seeds: the experiment report (or the runs' report) of its seeds,
    aggregated, and `verdicts.md` from its summary."""
    run = RunDir(root)
    summary = run.summary()
    if summary is None or summary.get("experiment") != "seeds":
        raise RunError(f"'{root}' holds no finished run over seeds (no seeds summary.json)")
    subs = [Path(root) / f"seed-{s}" for s in summary["seeds"]]
    if RunDir(subs[0]).is_experiment():
        written = write_experiment_report([str(p) for p in subs], out)
    else:
        written = write_report(subs, out, title=Path(root).name)
    atomic_write_text(out / "verdicts.md", seeds_table(summary))
    return written + [out / "verdicts.md"]
