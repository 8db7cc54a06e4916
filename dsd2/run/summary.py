"""A run's summary: w_best, phases, cost, and the early stop, from its per-level rows."""

from __future__ import annotations

from typing import Any

from dsd2.analysis.early_stop import StopDecision
from dsd2.analysis.phases import detect_phases


def best_level(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """w_best: the level with the highest validation accuracy; ties go to the sparser level."""
    if not rows:
        return None
    return max(rows, key=lambda r: (r["val_acc"], r["sparsity"]))


def phases_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    phases = detect_phases([r["test_acc"] for r in rows])
    return {"labels": phases.labels, "has_critical": phases.has_critical, "dip": phases.dip,
            "rise": phases.rise, "threshold": phases.threshold, "describe": phases.describe()}


def run_summary(rows: list[dict[str, Any]], run_hash: str, relu_layers: list[str]) -> dict[str, Any]:
    """The summary of a finished run (rows: one per level)."""
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


def student_entry(summary: dict[str, Any], rows: list[dict[str, Any]], run: str) -> dict[str, Any]:
    """One student's line in the experiment's summary."""
    phases = detect_phases([r["test_acc"] for r in rows])
    return {
        "run": run, "best_level": summary["best_level"], "best_test_acc": summary["best_test_acc"],
        "best_sparsity": summary["best_sparsity"], "dense_test_acc": summary["dense_test_acc"],
        "final_test_acc": summary["final_test_acc"], "critical_dip": phases.has_critical,
        "dip_points": phases.dip * 100, "rise_points": phases.rise * 100, "phases": phases.describe(),
        "train_pflops_dense": summary["train_pflops_dense"], "teacher_pflops": summary.get("teacher_pflops", 0.0),
    }
