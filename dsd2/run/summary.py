"""A run's summary: w_best, phases, cost, and the early stop, from its per-level rows."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from dsd2.analysis.early_stop import StopDecision
from dsd2.analysis.phases import detect_phases
from dsd2.analysis.stats import dip_verdict, mean_ci, unpack_outcomes
from dsd2.runs import RunError


def best_level(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """w_best: the level with the highest validation accuracy; ties go to the sparser level."""
    if not rows:
        return None
    return max(rows, key=lambda r: (r["val_acc"], r["sparsity"]))


def phases_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    phases = detect_phases([r["test_acc"] for r in rows])
    return {"labels": phases.labels, "has_critical": phases.has_critical, "dip": phases.dip,
            "rise": phases.rise, "threshold": phases.threshold, "describe": phases.describe()}


def run_summary(rows: list[dict[str, Any]], run_hash: str, relu_layers: list[str], margin: float) -> dict[str, Any]:
    """The summary of a finished run (rows: one per level); `margin`: the dodge margin of its verdict."""
    best = best_level(rows)
    return {
        "run_hash": run_hash,
        "finished": True,
        "levels": len(rows),
        "best_level": best["level"],
        "best_sparsity": best["sparsity"],
        "best_val_acc": best["val_acc"],
        "best_test_acc": best["test_acc"],
        "dense_test_acc": rows[0]["test_acc"],
        "final_sparsity": rows[-1]["sparsity"],
        "final_test_acc": rows[-1]["test_acc"],
        "total_wall_time_s": sum(r["wall_time_s"] for r in rows),
        "train_pflops_dense": sum(r.get("train_flops_dense", 0.0) for r in rows) / 1e15,
        "train_pflops_effective": sum(r.get("train_flops_effective", 0.0) for r in rows) / 1e15,
        "flop_convention": "fvcore: 1 FLOP per multiply-add; training = 3 x forward per image",
        "phases": phases_summary(rows),
        "verdict": verdict_of([rows], margin),
        "relu_layers": relu_layers,
    }


def early_stop_summary(rows: list[dict[str, Any]], stop: StopDecision | None, rule: str, patience: int,
                       levels_planned: int, level_cost_dense: float) -> dict[str, Any]:
    """What the early stop decided, what it returned, and the training it saved (`level_cost_dense`: the
    dense-convention FLOPs of one level not run; exact, since it does not depend on the masks)."""
    best = best_level(rows)
    remaining = max(levels_planned - len(rows), 0)
    return {
        "rule": rule, "patience": patience, "stopped": bool(stop and stop.stop),
        "stop_level": rows[-1]["level"], "stop_test_acc": rows[-1]["test_acc"],
        "entropy_drop_level": stop.entropy_drop_level if stop else None,
        "reason": stop.reason if stop else "",
        "returned_level": best["level"], "returned_test_acc": best["test_acc"],
        "returned_sparsity": best["sparsity"], "levels_run": len(rows), "levels_planned": levels_planned,
        "train_pflops_run_dense": sum(r["train_flops_dense"] for r in rows) / 1e15,
        "train_pflops_saved_dense": remaining * level_cost_dense / 1e15,
    }


def student_entry(summary: dict[str, Any], rows: list[dict[str, Any]], run: str, margin: float) -> dict[str, Any]:
    """One student's line in the experiment's summary: its w_best, phases, and the dip's verdict (one seed: the
    interval covers the test images only)."""
    phases = detect_phases([r["test_acc"] for r in rows])
    return {
        "run": run, "best_level": summary["best_level"], "best_test_acc": summary["best_test_acc"],
        "best_sparsity": summary["best_sparsity"], "dense_test_acc": summary["dense_test_acc"],
        "final_test_acc": summary["final_test_acc"], "critical_dip": phases.has_critical,
        "dip_points": phases.dip * 100, "rise_points": phases.rise * 100, "phases": phases.describe(),
        "verdict": summary.get("verdict") or verdict_of([rows], margin),  # the run's own, unless made before verdicts
        "train_pflops_dense": summary["train_pflops_dense"], "teacher_pflops": summary.get("teacher_pflops", 0.0),
    }


# ---- seeds of one configuration: curves with intervals, headline numbers, the verdict ----------------------------

# per-level measures aggregated over seeds (where every seed's row has them)
CURVE_KEYS = ("test_acc", "val_acc", "train_acc", "entropy_mean", "dist_from_init", "dist_from_level_start")
UNIT = {"test_acc": (0.0, 1.0), "val_acc": (0.0, 1.0), "train_acc": (0.0, 1.0)}  # fractions: intervals cut to them


def common_levels(rows_per_seed: list[list[dict[str, Any]]]) -> list[dict[int, dict[str, Any]]]:
    """Each seed's rows by level, for the levels every seed has completed."""
    by_level = [{r["level"]: r for r in rows} for rows in rows_per_seed]
    levels = sorted(set.intersection(*(set(b) for b in by_level)))
    return [{level: b[level] for level in levels} for b in by_level]


def outcomes_of(rows_per_seed: list[list[dict[str, Any]]]) -> torch.Tensor | None:
    """The per-image test outcomes [seeds, levels, images] of the levels every seed has; None when a row lacks
    them (a run made before they were recorded)."""
    seeds = common_levels(rows_per_seed)
    if any("test_outcomes" not in r for b in seeds for r in b.values()):
        return None
    sizes = {r["test_images"] for b in seeds for r in b.values()}
    if len(sizes) > 1:
        raise RunError(f"the runs were tested on different test sets ({', '.join(map(str, sorted(sizes)))} images); "
                       "only seeds of one configuration aggregate")
    return torch.stack([torch.stack([unpack_outcomes(r["test_outcomes"], r["test_images"]) for r in b.values()])
                        for b in seeds])


def verdict_of(rows_per_seed: list[list[dict[str, Any]]], margin: float) -> dict[str, Any]:
    """The dip's interval and verdict (`dsd2.analysis.stats.dip_verdict`) on the seeds' test outcomes."""
    x = outcomes_of(rows_per_seed)
    if x is None:
        return {"verdict": None, "describe": "no verdict: these runs hold no per-image test outcomes (runs made "
                "before they were recorded); rerun them"}
    return dip_verdict(x, margin=margin).to_dict()


def seed_curves(rows_per_seed: list[list[dict[str, Any]]], margin: float,
                summaries: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """One configuration over its seeds: every curve point and headline number as mean, std and 95 % interval
    (`mean_ci`), the phases of the mean curve, the dip's verdict, and each seed's early stop aggregated."""
    seeds = common_levels(rows_per_seed)
    points = []
    for level in seeds[0]:
        rows = [b[level] for b in seeds]
        point = {"level": level, "sparsity": statistics.fmean(r["sparsity"] for r in rows)}
        point.update({key: mean_ci([r[key] for r in rows], UNIT.get(key)) for key in CURVE_KEYS
                      if all(key in r for r in rows)})
        points.append(point)
    best = [best_level(rows) for rows in rows_per_seed]  # w_best of each seed, by its validation accuracy
    headline = {
        "dense_test_acc": mean_ci([rows[0]["test_acc"] for rows in rows_per_seed], (0.0, 1.0)),
        "best_test_acc": mean_ci([b["test_acc"] for b in best], (0.0, 1.0)),
        "best_sparsity": mean_ci([b["sparsity"] for b in best], (0.0, 1.0)),
        "final_test_acc": mean_ci([rows[-1]["test_acc"] for rows in rows_per_seed], (0.0, 1.0)),
        "train_pflops_dense": mean_ci([sum(r.get("train_flops_dense", 0.0) for r in rows) / 1e15
                                       for rows in rows_per_seed]),
    }
    stops = [s["early_stop"] for s in summaries or [] if s and "early_stop" in s]
    if stops and len(stops) == len(rows_per_seed):
        headline.update({f"early_stop_{key}": mean_ci([s[key] for s in stops])
                         for key in ("returned_test_acc", "levels_run", "train_pflops_saved_dense")})
    curves = [[b[level]["test_acc"] for level in b] for b in seeds]
    phases = detect_phases(curves if len(curves) > 1 else curves[0])
    return {"seeds": len(rows_per_seed), "points": points, "headline": headline,
            "phases": {"labels": phases.labels, "has_critical": phases.has_critical, "describe": phases.describe()},
            "verdict": verdict_of(rows_per_seed, margin)}
