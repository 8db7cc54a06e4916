"""`dsd2-engine study sdd`: what causes sparse double descent? The paper's contingent factors, over seeds.

The factors (DSD² §5, He et al. §4): the perturbation after each prune (none, rewind to the initial weights,
re-initialisation, or learning-rate rewinding: the weights kept, the dense schedule's last epochs replayed), the
network's width and depth, and the label noise. By default each factor is varied alone around the base
configuration (one factor at a time, as the papers do); `--full-grid` runs every combination. Each setting's IMP
curve is one teacher run per seed, placed and launched by the sweep machinery (`dsd2.sweep.launch`: local, Slurm or
submitit-local), so a finished run is reused and a killed study resumes by running the same command:

    ROOT/study.json                  the grid, the design, the seeds and the base configuration's hash
    ROOT/runs/<run hash>/            one IMP curve (a run of the level loop)
    ROOT/study.md, study.csv, study_summary.json, study_heatmap.png|svg

For each setting: the dip of the mean curve with its simultaneous 95 % interval and the verdict
(`dsd2.analysis.stats`), the phases of the mean curve, the level where the ReLU-state entropy turns down, the level
the entropy early stop would return against w_best (the best validation level of the whole curve), and the cost.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dsd2.analysis.early_stop import decide, entropy_drop_level
from dsd2.config import Config, ConfigError
from dsd2.report.units import format_dip, format_pflops
from dsd2.run.experiment import seed_config, teacher_config
from dsd2.run.identity import upgrade_runs, upgraded_json
from dsd2.run.summary import best_level, seed_curves
from dsd2.runs import RunDir, RunError, atomic_write_text, write_json
from dsd2.study import claim_record, save_figure
from dsd2.sweep import launch, run_dir_for
from dsd2.training.precision import concrete_precision

FACTORS = ("perturb", "noise", "width", "depth")
PERTURBATION_CHOICES = ("none", "rewind", "reinit", "lr-rewind")  # lr-rewind: the retrain schedule of that name
DEFAULT_NOISES = (0.0, 0.1, 0.2, 0.5)
DEFAULT_SEEDS = (0, 1, 2)
SIZED_MODELS = ("mlp", "vgg")  # the models whose width and depth the study can vary


@dataclass(frozen=True)
class SddSetting:
    perturb: str
    noise: float
    width: int | None  # None: a model whose size the study cannot vary (LeNet-5, ResNet-18)
    depth: int | None

    @property
    def name(self) -> str:
        size = "" if self.width is None else f"-w{self.width}-d{self.depth}"
        return f"{self.perturb}-n{self.noise:g}{size}"


def base_setting(cfg: Config) -> SddSetting:
    """The base configuration's value of every factor (an MLP's width is its first hidden layer's; a model of
    fixed size has none)."""
    perturb = "lr-rewind" if cfg.prune.retrain == "lr-rewind" else cfg.prune.perturb
    if cfg.model.name == "mlp":
        return SddSetting(perturb, cfg.data.noise, cfg.model.hidden[0], len(cfg.model.hidden))
    if cfg.model.name == "vgg":
        return SddSetting(perturb, cfg.data.noise, cfg.model.width, cfg.model.depth)
    return SddSetting(perturb, cfg.data.noise, None, None)


def default_grid(cfg: Config) -> dict[str, tuple]:
    """Every perturbation and the noises 0, 10, 20 and 50 %; widths a quarter, once and twice the base's (VGG-like:
    gamma - 1, gamma, gamma + 1), depths one fewer and one more (an MLP's from one hidden layer)."""
    base = base_setting(cfg)
    if cfg.model.name == "mlp":
        widths, depths = (max(1, base.width // 4), base.width, 2 * base.width), (1, base.depth, base.depth + 1)
    elif cfg.model.name == "vgg":
        widths, depths = (base.width - 1, base.width, base.width + 1), (base.depth - 1, base.depth, base.depth + 1)
    else:
        return {"perturb": PERTURBATION_CHOICES, "noise": DEFAULT_NOISES, "width": (None,), "depth": (None,)}
    return {"perturb": PERTURBATION_CHOICES, "noise": DEFAULT_NOISES, "width": tuple(sorted(set(widths))),
            "depth": tuple(sorted({d for d in depths if d >= 1}))}


def settings(grid: dict[str, tuple], base: SddSetting, full: bool) -> list[SddSetting]:
    """Every combination (`full`), or the base and each factor's other values with the rest at the base's."""
    if full:
        return [SddSetting(*combo) for combo in itertools.product(*(grid[f] for f in FACTORS))]
    out = [base]
    for factor in FACTORS:
        out += [replace(base, **{factor: v}) for v in grid[factor] if v != getattr(base, factor)]
    return out


def check_grid(grid: dict[str, tuple], cfg: Config) -> None:
    """Each axis non-empty and allowed for the base configuration, one sentence per problem."""
    for factor in FACTORS:
        if not grid[factor]:
            raise ConfigError(f"study axis '{factor}' is empty; give at least one value")
    bad = [p for p in grid["perturb"] if p not in PERTURBATION_CHOICES]
    if bad:
        raise ConfigError(f"study perturbation '{bad[0]}' is not known; allowed: {', '.join(PERTURBATION_CHOICES)}")
    if any(not 0.0 <= n < 1.0 for n in grid["noise"]):
        raise ConfigError(f"study noises {list(grid['noise'])} must lie in [0, 1)")
    base = base_setting(cfg)
    if cfg.model.name not in SIZED_MODELS and (set(grid["width"]) != {base.width} or
                                               set(grid["depth"]) != {base.depth}):
        raise ConfigError(f"model '{cfg.model.name}' has no width or depth the study can vary; use mlp or vgg, or "
                          "leave --widths and --depths out")
    if any(w is not None and w < 1 for w in grid["width"]) or any(d is not None and d < 1 for d in grid["depth"]):
        raise ConfigError(f"study widths {list(grid['width'])} and depths {list(grid['depth'])} must be positive")


def setting_config(cfg: Config, s: SddSetting) -> Config:
    """The teacher-only config of one setting (`cfg` carries the seed); a bad combination fails like a flag."""
    from dsd2.config import from_dict, merge

    raw = cfg.to_dict()
    model = ({"hidden": [s.width] * s.depth} if cfg.model.name == "mlp" else
             {"width": s.width, "depth": s.depth} if cfg.model.name == "vgg" else {})
    retrain = "lr-rewind" if s.perturb == "lr-rewind" else ("restart" if cfg.prune.retrain == "lr-rewind"
                                                             else cfg.prune.retrain)
    prune = {"perturb": "none" if s.perturb == "lr-rewind" else s.perturb, "retrain": retrain}
    raw = merge(raw, {"data": {"noise": s.noise}, "model": model, "prune": prune})
    try:
        return concrete_precision(teacher_config(from_dict(raw)))
    except ConfigError as exc:
        raise ConfigError(f"study setting {s.name}: {exc}") from None


def upgrade_fixed_size_grid(path: Path, cfg: Config) -> None:
    """A study of a fixed-size model (LeNet-5, ResNet-18) that an earlier version made recorded the unused width and
    depth of the model config as one-value axes; record them as none, as this version does, so the study resumes."""
    if cfg.model.name in SIZED_MODELS or not path.is_file():
        return
    record = json.loads(path.read_text())
    grid = record.get("grid", {})
    if grid.get("width") == [cfg.model.width] and grid.get("depth") == [cfg.model.depth]:
        write_json(path, {**record, "grid": {**grid, "width": [None], "depth": [None]}})


def run_sdd_study(cfg: Config, root: Path, grid: dict[str, tuple] | None = None, *, full: bool = False,
                  launcher: str = "local", slurm: dict[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every setting's IMP curve on every seed, then write the study's table, heatmap and summary."""
    seeds = tuple(cfg.seeds) or DEFAULT_SEEDS
    cfg = concrete_precision(replace(cfg, seeds=()))
    grid = {**default_grid(cfg), **{k: tuple(v) for k, v in (grid or {}).items()}}
    check_grid(grid, cfg)
    chosen = settings(grid, base_setting(cfg), full)
    configs = {(s, seed): setting_config(seed_config(cfg, seed), s) for s in chosen for seed in seeds}
    root = Path(root)
    renames = upgrade_runs(root, {cfg.legacy_run_hash(): cfg.run_hash()})  # a study an earlier release made
    upgraded_json(root / "study.json", "base_config_hash", renames)
    upgrade_fixed_size_grid(root / "study.json", cfg)
    claim_record(root, {"study": "sdd", "base_config_hash": cfg.run_hash(), "seeds": list(seeds),
                       "design": "full" if full else "one factor at a time",
                       "grid": {k: list(v) for k, v in grid.items()}})
    unique = list({c.run_hash(): c for c in configs.values()}.values())
    failures = launch(unique, root / "runs", launcher, log, slurm)
    if failures:
        raise RunError(f"{len(failures)} of {len(unique)} study runs failed ({failures[0]}); rerun the study after "
                       "fixing them")
    runs = {key: RunDir(run_dir_for(root / "runs", c)) for key, c in configs.items()}
    rows = [study_row(s, [runs[(s, seed)] for seed in seeds], cfg) for s in chosen]
    summary = {"study": "sdd", "seeds": list(seeds), "dodge_margin": cfg.analysis.dodge_margin,
               "design": "full" if full else "one factor at a time", "base": base_setting(cfg).__dict__,
               "grid": {k: list(v) for k, v in grid.items()}, "settings": rows,
               "wall_time_s": sum(r["wall_time_s"] for r in rows)}
    write_json(root / "study_summary.json", summary)
    md, csv_text = study_table(rows, cfg.analysis.dodge_margin)
    atomic_write_text(root / "study.md", md)
    atomic_write_text(root / "study.csv", csv_text)
    heatmap(rows, base_setting(cfg), full, root / "study_heatmap")
    return summary


def entropy_stop(rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Where one curve's entropy turns down, and the level the entropy early stop would have returned."""
    a = cfg.analysis
    entropies = [r.get("entropy_mean") for r in rows]
    if any(h is None for h in entropies):
        return {"turn": None, "stop": None, "returned": None}
    vals = [r["val_acc"] for r in rows]
    for level in range(len(rows)):
        d = decide("entropy", vals[:level + 1], entropies[:level + 1], patience=a.patience,
                   tolerance=a.entropy_tolerance)
        if d.stop:
            return {"turn": d.entropy_drop_level, "stop": level, "returned": d.best_level}
    return {"turn": entropy_drop_level(entropies, a.entropy_tolerance), "stop": None,
            "returned": best_level(rows)["level"]}


def _mean(values: list[float | None]) -> float | None:
    given = [v for v in values if v is not None]
    return statistics.fmean(given) if given else None


def study_row(s: SddSetting, runs: list[RunDir], cfg: Config) -> dict[str, Any]:
    """One setting's line: the teacher curve's dip, interval and verdict, phases, entropy turn and stop, cost."""
    levels = [r.levels() for r in runs]
    summaries = [r.summary() for r in runs]
    curve = seed_curves(levels, cfg.analysis.dodge_margin, summaries)
    v, h = curve["verdict"], curve["headline"]
    stops = [entropy_stop(rows, cfg) for rows in levels]
    best = [best_level(rows) for rows in levels]
    returned = [next(r for r in rows if r["level"] == st["returned"]) if st["returned"] is not None else None
                for rows, st in zip(levels, stops)]
    return {
        "setting": s.name, **s.__dict__, "seeds": curve["seeds"], "runs": [str(r.root) for r in runs],
        "verdict": v["verdict"], "dip": v.get("dip"), "dip_lower": v.get("lower"), "dip_upper": v.get("upper"),
        "seeds_needed": v.get("seeds_needed"), "critical_level": v.get("critical_level"),
        "sweet_level": v.get("sweet_level"), "phases": curve["phases"]["describe"],
        "dense_test_acc": h["dense_test_acc"]["mean"], "best_test_acc": h["best_test_acc"]["mean"],
        "best_level": _mean([b["level"] for b in best]), "best_sparsity": h["best_sparsity"]["mean"],
        "entropy_turn_level": _mean([st["turn"] for st in stops]),
        "entropy_stop_level": _mean([st["stop"] for st in stops]),
        "entropy_stop_test_acc": _mean([r["test_acc"] if r else None for r in returned]),
        "train_pflops": h["train_pflops_dense"]["mean"],
        "wall_time_s": sum(x["total_wall_time_s"] for x in summaries if x),
    }


HEADER = ["setting", "seeds", "dip (points) [95 % CI]", "verdict", "phases (mean curve)", "dense / best test (%)",
          "w_best level", "entropy turns at", "entropy stop: level / test (%)", "train FLOPs", "wall (s)"]


def _level(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def study_table(rows: list[dict[str, Any]], margin: float) -> tuple[str, str]:
    """Markdown (readable units) and CSV (exact numbers) of the study's rows."""
    lines = [f"| {' | '.join(HEADER)} |", f"|{'---|' * len(HEADER)}"]
    for r in rows:
        stop = ("never" if r["entropy_stop_level"] is None else
                f"{r['entropy_stop_level']:.1f} / {r['entropy_stop_test_acc'] * 100:.2f}")
        cells = [r["setting"], r["seeds"], format_dip(r["dip"], r["dip_lower"], r["dip_upper"]), r["verdict"],
                 r["phases"], f"{r['dense_test_acc'] * 100:.2f} / {r['best_test_acc'] * 100:.2f}",
                 _level(r["best_level"]), _level(r["entropy_turn_level"]), stop, format_pflops(r["train_pflops"]),
                 f"{r['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Setting: perturbation after each prune, label noise, width, depth. Dip: the deepest valley of the "
              "mean teacher curve; SDD present if its 95 % lower bound is above 0, dodged if its upper bound is below "
              f"{margin * 100:g} point(s). Levels are means over seeds; the entropy stop returns the best validation "
              "level seen when it stops."]
    buf = io.StringIO()
    keys = [k for k in rows[0] if k != "runs"] if rows else []
    writer = csv.writer(buf)
    writer.writerow(keys)
    for r in rows:
        writer.writerow([r[k] for k in keys])
    return "\n".join(lines) + "\n", buf.getvalue()


def heatmap(rows: list[dict[str, Any]], base: SddSetting, full: bool, stem: Path) -> None:
    """The dip of every setting with its interval and verdict (P present, D dodged, ? inconclusive): one row per
    factor and its values (one factor at a time), or rows perturbation x width x depth and columns noise (full)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if full:
        ys = sorted({(r["perturb"], r["width"], r["depth"]) for r in rows})
        xs = sorted({r["noise"] for r in rows})
        cell = {((r["perturb"], r["width"], r["depth"]), r["noise"]): r for r in rows}
        ylabels = [p if w is None else f"{p}, w{w}, d{d}" for p, w, d in ys]
        xlabels = [f"noise {x:g}" for x in xs]
    else:
        ys = varied_factors(rows, base)
        width = max(sum(1 for r in rows if _varies(r, base, f)) for f in ys) + 1
        xs = list(range(width))
        cell = {}
        for f in ys:
            mine = [r for r in rows if _varies(r, base, f) or r["setting"] == base.name]
            for i, r in enumerate(sorted(mine, key=lambda r: PERTURBATION_CHOICES.index(r[f]) if f == "perturb"
                                         else r[f])):
                cell[(f, i)] = r
        ylabels = [f"{f} (base {getattr(base, f)})" for f in ys]
        xlabels = ["" for _ in xs]
    letter = {"SDD present": "P", "dodged": "D", "inconclusive": "?", None: "-"}
    values = [[(cell[(y, x)]["dip"] or 0.0) * 100 if (y, x) in cell else float("nan") for x in xs] for y in ys]
    fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 3, 0.8 * len(ys) + 1.8))
    top = max([5.0] + [v for row in values for v in row if v == v])
    image = ax.imshow(values, cmap="Reds", vmin=0, vmax=top)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            r = cell.get((y, x))
            if r is None:
                continue
            head = "" if full else f"{r[y]:g}\n" if y != "perturb" else f"{r[y]}\n"
            ax.text(j, i, f"{head}{format_dip(r['dip'], r['dip_lower'], r['dip_upper'])}\n{letter[r['verdict']]}",
                    ha="center", va="center", fontsize=7, color="white" if values[i][j] > 0.6 * top else "black")
    ax.set_xticks(range(len(xs)), xlabels)
    ax.set_yticks(range(len(ys)), ylabels)
    ax.set_title("teacher curve's dip (points) [95 % CI] and verdict (P present, D dodged, ? inconclusive)", fontsize=9)
    fig.colorbar(image, ax=ax, label="dip (points)")
    save_figure(fig, stem)


def varied_factors(rows: list[dict[str, Any]], base: SddSetting) -> list[str]:
    """The factors some row changes alone (one heatmap row each); the perturbation's when none does."""
    return [f for f in FACTORS if any(_varies(r, base, f) for r in rows)] or ["perturb"]


def _varies(row: dict[str, Any], base: SddSetting, factor: str) -> bool:
    """Whether `row` is the setting that changes `factor` alone."""
    return row[factor] != getattr(base, factor) and all(row[f] == getattr(base, f) for f in FACTORS if f != factor)


def grid_hash(grid: dict[str, tuple], full: bool) -> str:
    """A short name for a grid and its design (the study's default folder)."""
    text = json.dumps({"full": full, **{k: list(v) for k, v in grid.items()}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
