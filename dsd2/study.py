"""`dsd2-engine study kd`: when does distillation dodge sparse double descent?

A grid over the KD weight alpha, the temperature tau, the student's width and the teacher (the dense one, or the
best sparse level of the teacher's IMP curve), each setting run over seeds, beside the vanilla student (no
teacher) at each width. Every run is a resumable run of the level loop:

    ROOT/study.json                  the grid, the seeds and the base configuration's hash
    ROOT/teachers/seed-S/            the teacher's IMP curve of seed S (shared by every setting)
    ROOT/runs/<setting>/seed-S/      one student curve
    ROOT/study.md, study.csv, study_summary.json, study_heatmap.png|svg

For each setting: the dip with its simultaneous 95 % interval and the verdict (`dsd2.analysis.stats`), the best
test accuracy (w_best by validation) and its sparsity, He et al.'s l2 learning distance from the initial weights
at the critical level and at the sweet level, and the cost (training FLOPs, teacher inference FLOPs, wall time).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dsd2.config import Config, ConfigError
from dsd2.report.units import format_dip, format_pflops
from dsd2.run.cores import Job, phase_workers, run_jobs
from dsd2.run.experiment import seed_config, student_config, teacher_config
from dsd2.run.identity import upgrade_runs, upgraded_json
from dsd2.run.summary import seed_curves
from dsd2.run.teacher import resolve_teacher_level
from dsd2.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text, write_json
from dsd2.training.precision import concrete_precision

STUDY_KINDS = ("kd",)
TEACHERS = ("none", "dense", "best")  # none: the vanilla student, cross-entropy alone
DEFAULT_GRID: dict[str, tuple] = {"alpha": (0.8, 1.0), "temperature": (2.0, 10.0), "width": (64, 128),
                                  "teacher": TEACHERS}
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Setting:
    teacher: str
    width: int
    alpha: float | None  # None for the vanilla student
    temperature: float | None

    @property
    def name(self) -> str:
        if self.teacher == "none":
            return f"vanilla-w{self.width}"
        return f"{self.teacher}-w{self.width}-a{self.alpha:g}-t{self.temperature:g}"


def settings(grid: dict[str, tuple]) -> list[Setting]:
    """The grid's settings: one vanilla student per width, and every (teacher, width, alpha, tau) with a teacher."""
    out = []
    for teacher, width in itertools.product(grid["teacher"], grid["width"]):
        if teacher == "none":
            out.append(Setting("none", width, None, None))
            continue
        out += [Setting(teacher, width, a, t) for a, t in itertools.product(grid["alpha"], grid["temperature"])]
    return out


def check_grid(grid: dict[str, tuple], cfg: Config) -> None:
    """Each axis non-empty and inside what the config allows, in one sentence per problem."""
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"study axis '{key}' is empty; give at least one value")
    bad = [t for t in grid["teacher"] if t not in TEACHERS]
    if bad:
        raise ConfigError(f"study teacher '{bad[0]}' is not known; allowed: {', '.join(TEACHERS)}")
    if any(not 0.0 <= a <= 1.0 for a in grid["alpha"]):
        raise ConfigError(f"study alphas {list(grid['alpha'])} must lie in [0, 1]")
    if any(t <= 0 for t in grid["temperature"]):
        raise ConfigError(f"study temperatures {list(grid['temperature'])} must be > 0")
    if any(w < 1 for w in grid["width"]):
        raise ConfigError(f"study widths {list(grid['width'])} must be positive")
    if cfg.distill.student_model not in ("mlp", "vgg"):
        raise ConfigError(f"student model '{cfg.distill.student_model}' has no width the study can vary; use mlp "
                          "or vgg")


def student_of(cfg: Config, setting: Setting, teacher_dir: Path, teacher_hash: str, best: int) -> Config:
    """The config of one setting's student on one seed (`cfg` already carries the seed)."""
    k = cfg.distill
    width = ({"student_hidden": (setting.width,) * len(k.student_hidden)} if k.student_model == "mlp"
             else {"student_width": setting.width})
    kd = {} if setting.teacher == "none" else {"alpha": setting.alpha, "temperature": setting.temperature}
    base = replace(cfg, distill=replace(k, **width, **kd))
    kind = {"none": "vanilla", "dense": "kd-dense", "best": "kd-sparse"}[setting.teacher]
    return student_config(base, kind, teacher_dir, teacher_hash, best)


def claim_study(root: Path, cfg: Config, grid: dict[str, tuple], seeds: tuple[int, ...]) -> None:
    """Write ROOT/study.json, or check that the one there describes this study."""
    claim_record(root, {"study": "kd", "base_config_hash": cfg.run_hash(), "seeds": list(seeds),
                        "grid": {k: list(v) for k, v in grid.items()}})


def claim_record(root: Path, record: dict[str, Any]) -> None:
    """Write `record` as ROOT/study.json, or check that the one there is the same (every study kind's claim)."""
    path = root / "study.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != record:
            raise RunError(f"'{root}' holds another study (its study.json differs: grid, design, seeds or base "
                           "config); choose another --out")
        return
    if root.exists() and any(root.iterdir()):
        raise RunError(f"output folder '{root}' is not empty and holds no study; choose another --out")
    write_json(path, record)


def run_kd_study(cfg: Config, root: Path, grid: dict[str, tuple] | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every teacher and student of the study, then write its table, heatmap and summary."""
    grid = {**DEFAULT_GRID, **(grid or {})}
    seeds = tuple(cfg.seeds) or DEFAULT_SEEDS
    cfg = concrete_precision(replace(cfg, seeds=()))
    check_grid(grid, cfg)
    root = Path(root)
    renames = upgrade_runs(root, {cfg.legacy_run_hash(): cfg.run_hash()})  # a study 0.1.0 made
    upgraded_json(root / "study.json", "base_config_hash", renames)
    claim_study(root, cfg, grid, seeds)
    teacher_jobs = [Job(f"teacher, seed {seed}", teacher_config(seed_config(cfg, seed)),
                        RunDir(root / "teachers" / f"seed-{seed}")) for seed in seeds]

    def students(vanilla: bool, teachers: dict[int, tuple[Path, str, int]]) -> list[Job]:
        return [Job(f"{setting.name}, seed {seed}", student_of(seed_config(cfg, seed), setting, *teachers[seed]),
                    RunDir(root / "runs" / setting.name / f"seed-{seed}"))
                for setting in settings(grid) if (setting.teacher == "none") == vanilla for seed in seeds]

    # the teachers and the vanilla students (labels alone) side by side, then every distilled student
    no_teacher = {seed: (Path(), "", 0) for seed in seeds}
    # each phase side by side as its own runs allow: a conv teacher's phase one at a time, its MLP students' not
    first = [*teacher_jobs, *students(True, no_teacher)]
    done = run_jobs(first, phase_workers(first), progress=progress, log=log)
    teachers = {seed: (job.run_dir.root.resolve(), summary["run_hash"], resolve_teacher_level(job.run_dir, "best"))
                for seed, job, summary in zip(seeds, teacher_jobs, done)}
    distilled = students(False, teachers)
    run_jobs(distilled, phase_workers(distilled), progress=progress, log=log)
    return write_study(root, grid, seeds, cfg.analysis.dodge_margin)


def _at_level(curve: dict[str, Any], key: str, level: int) -> float | None:
    point = next((p for p in curve["points"] if p["level"] == level), None)
    return None if point is None or key not in point else point[key]["mean"]


def study_row(setting: Setting, runs: list[RunDir], margin: float) -> dict[str, Any]:
    """One setting's line of the study: verdict, accuracy, sparsity, l2 distances, cost."""
    summaries = [r.summary() for r in runs]
    curve = seed_curves([r.levels() for r in runs], margin, summaries)
    v, h = curve["verdict"], curve["headline"]
    return {
        "setting": setting.name, "teacher": setting.teacher, "width": setting.width, "alpha": setting.alpha,
        "temperature": setting.temperature, "seeds": curve["seeds"], "verdict": v["verdict"], "dip": v.get("dip"),
        "dip_lower": v.get("lower"), "dip_upper": v.get("upper"), "seeds_needed": v.get("seeds_needed"),
        "note": v.get("note", v.get("describe", "")), "critical_level": v.get("critical_level"),
        "sweet_level": v.get("sweet_level"), "dense_test_acc": h["dense_test_acc"], "best_test_acc": h["best_test_acc"],
        "best_sparsity": h["best_sparsity"],
        "dist_init_critical": _at_level(curve, "dist_from_init", v.get("critical_level") or 0),
        "dist_init_sweet": _at_level(curve, "dist_from_init", v.get("sweet_level") or 0),
        "dist_peak_level": max(curve["points"], key=lambda p: p.get("dist_from_init", {}).get("mean", 0))["level"],
        "train_pflops": h["train_pflops_dense"]["mean"],
        "teacher_pflops": sum(s.get("teacher_pflops", 0.0) for s in summaries if s) / len(runs),
        "wall_time_s": sum(s["total_wall_time_s"] for s in summaries if s),
    }


def write_study(root: Path, grid: dict[str, tuple], seeds: tuple[int, ...], margin: float) -> dict[str, Any]:
    rows = [study_row(s, [RunDir(root / "runs" / s.name / f"seed-{seed}") for seed in seeds], margin)
            for s in settings(grid)]
    teacher_time = sum((RunDir(root / "teachers" / f"seed-{s}").summary() or {}).get("total_wall_time_s", 0.0)
                       for s in seeds)
    summary = {"study": "kd", "seeds": list(seeds), "dodge_margin": margin,
               "grid": {k: list(v) for k, v in grid.items()},
               "settings": rows, "teacher_wall_time_s": teacher_time,
               "wall_time_s": teacher_time + sum(r["wall_time_s"] for r in rows)}
    write_json(root / "study_summary.json", summary)
    md, csv_text = study_table(rows, margin)
    atomic_write_text(root / "study.md", md)
    atomic_write_text(root / "study.csv", csv_text)
    heatmap(rows, grid, root / "study_heatmap")
    return summary


STUDY_HEADER = ["setting", "seeds", "dip (points) [95 % CI]", "verdict", "best test acc (%)", "best sparsity (%)",
                "l2 from init: critical / sweet (peak level)", "train FLOPs", "teacher FLOPs", "wall (s)"]


def study_table(rows: list[dict[str, Any]], margin: float) -> tuple[str, str]:
    """Markdown (readable units) and CSV (exact numbers) of the study's rows."""
    lines = [f"| {' | '.join(STUDY_HEADER)} |", f"|{'---|' * len(STUDY_HEADER)}"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [k for k in rows[0] if not isinstance(rows[0][k], dict)] if rows else []
    writer.writerow(keys + ["best_test_acc", "best_test_ci_lo", "best_test_ci_hi", "best_sparsity"])
    for r in rows:
        acc, sp = r["best_test_acc"], r["best_sparsity"]
        dip = format_dip(r["dip"], r["dip_lower"], r["dip_upper"])
        ci = f" [{acc['ci95'][0] * 100:.1f}, {acc['ci95'][1] * 100:.1f}]" if acc["ci95"] else ""
        dist = (f"{r['dist_init_critical']:.2f} / {r['dist_init_sweet']:.2f} ({r['dist_peak_level']})"
                if r["dist_init_sweet"] is not None else "n/a")
        cells = [r["setting"], r["seeds"], dip, r["verdict"], f"{acc['mean'] * 100:.2f}{ci}",
                 f"{sp['mean'] * 100:.2f}", dist, format_pflops(r["train_pflops"]), format_pflops(r["teacher_pflops"]),
                 f"{r['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        ci_cells = acc["ci95"] or [None, None]
        writer.writerow([r[k] for k in keys] + [acc["mean"], *ci_cells, sp["mean"]])
    lines += ["", "Dip: the deepest valley of the mean curve, min(drop from dense to the critical level, climb from "
              "there to the sweet peak); SDD present if its 95 % lower bound is above 0, dodged if its upper bound is "
              f"below {margin * 100:g} point(s). Settings: teacher "
              "(none = vanilla student, dense, best = the best sparse teacher level), student width, alpha, tau."]
    return "\n".join(lines) + "\n", buf.getvalue()


def heatmap(rows: list[dict[str, Any]], grid: dict[str, tuple], stem: Path) -> None:
    """The dip of every distilled setting: rows teacher x width, columns alpha x tau; each cell names its
    interval and verdict (P present, D dodged, ? inconclusive); the vanilla students' dips in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kd = [r for r in rows if r["teacher"] != "none"]
    ys = sorted({(r["teacher"], r["width"]) for r in kd}, key=lambda t: (TEACHERS.index(t[0]), t[1]))
    xs = sorted({(r["alpha"], r["temperature"]) for r in kd})
    cell = {(r["teacher"], r["width"], r["alpha"], r["temperature"]): r for r in kd}
    values = [[(cell[y + x]["dip"] or 0.0) * 100 for x in xs] for y in ys]
    fig, ax = plt.subplots(figsize=(1.9 * len(xs) + 2.5, 0.9 * len(ys) + 1.8))
    top = max(5.0, max(max(v) for v in values)) if values else 5.0
    image = ax.imshow(values, cmap="Reds", vmin=0, vmax=top)
    letter = {"SDD present": "P", "dodged": "D", "inconclusive": "?", None: "-"}
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            r = cell[y + x]
            text = format_dip(r["dip"], r["dip_lower"], r["dip_upper"])
            ax.text(j, i, f"{text}\n{letter[r['verdict']]}", ha="center", va="center", fontsize=8,
                    color="white" if values[i][j] > 0.6 * top else "black")
    ax.set_xticks(range(len(xs)), [f"α={a:g}\nτ={t:g}" for a, t in xs])
    ax.set_yticks(range(len(ys)), [f"{'dense' if t == 'dense' else 'best sparse'} teacher\nwidth {w}" for t, w in ys])
    vanilla = ", ".join(f"width {r['width']}: {(r['dip'] or 0) * 100:.1f}" for r in rows if r["teacher"] == "none")
    ax.set_title(f"dip (points) [95 % CI] and verdict (P present, D dodged, ? inconclusive)\nvanilla students: "
                 f"{vanilla or 'not run'}", fontsize=9)
    fig.colorbar(image, ax=ax, label="dip (points)")
    save_figure(fig, stem)


def save_figure(fig, stem: Path) -> None:
    """`stem`.png and .svg, each written atomically, then the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120)
        atomic_write_bytes(stem.with_suffix(f".{ext}"), buf.getvalue())
    plt.close(fig)


def grid_hash(grid: dict[str, tuple]) -> str:
    """A short name for a grid (the study's default folder)."""
    return hashlib.sha256(json.dumps({k: list(v) for k, v in grid.items()}, sort_keys=True).encode()).hexdigest()[:8]
