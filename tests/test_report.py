import csv

import pytest

from dsd2.analysis.curves import aggregate, dip_report
from dsd2.report import curve_table, write_report
from dsd2.runs import write_jsonl


def rows(accs, val=None):
    return [{"level": i, "sparsity": 1 - 0.8 ** i, "train_acc": 1.0, "val_acc": (val or accs)[i],
             "test_acc": a} for i, a in enumerate(accs)]


def test_aggregate_mean_and_std_per_level():
    pts = aggregate([rows([0.5, 0.7]), rows([0.7, 0.9])])
    assert [p.level for p in pts] == [0, 1]
    assert pts[0].mean == pytest.approx(0.6) and pts[1].mean == pytest.approx(0.8)
    assert pts[0].std == pytest.approx(0.1414, abs=1e-4) and pts[0].n == 2


@pytest.mark.parametrize("curve, dip, rise, crit, sweet", [
    ([0.60, 0.58, 0.53, 0.65, 0.77, 0.45], 0.07, 0.24, 2, 4),  # SDD: dip then rise
    ([0.60, 0.62, 0.64, 0.66], 0.0, 0.06, 0, 3),  # monotone up: no dip
    ([0.60, 0.55, 0.50], 0.0, 0.0, 0, 0),  # monotone down: best is dense
    ([0.5, 0.6, 0.52, 0.7], 0.08, 0.18, 2, 3),  # a dip below the running maximum, not the minimum
])
def test_dip_report(curve, dip, rise, crit, sweet):
    d = dip_report(curve)
    assert d.sweet_level == sweet and d.critical_level == crit
    assert d.rise == pytest.approx(rise) and d.dip == pytest.approx(dip)


def test_report_files_hold_the_metrics(tmp_path):
    paths = []
    for seed, accs in enumerate([[0.6, 0.5, 0.8, 0.4], [0.62, 0.52, 0.78, 0.42]]):
        run = tmp_path / f"s{seed}"
        write_jsonl(run / "metrics.jsonl", rows(accs))
        paths.append(run)
    written = write_report(paths, tmp_path / "out", title="t")
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    table = list(csv.DictReader(open(tmp_path / "out" / "curve.csv")))
    assert [float(r["test_acc"]) for r in table] == pytest.approx([0.61, 0.51, 0.79, 0.41], abs=1e-3)
    md, _ = curve_table([rows([0.6, 0.5, 0.8, 0.4])])
    assert "dip 10.0 points" in md and "rise 30.0 points" in md


@pytest.mark.slow
def test_report_of_engine_runs_plots_and_tabulates_the_metrics(tmp_path, tiny_config):
    import json
    import statistics

    from dsd2.run import LevelLoop
    from dsd2.runs import RunDir, read_jsonl

    paths = []
    for seed, hidden in [(0, (256, 256)), (1, (256, 256)), (0, (64, 64))]:
        run = tmp_path / f"r{seed}-{hidden[0]}"
        LevelLoop(tiny_config(seed=seed, model__hidden=hidden), RunDir(run), progress=False,
               log=lambda s: None).run()
        paths.append(run)
    out = tmp_path / "report"
    written = write_report(paths, out)
    names = {p.name for p in written}
    assert {"fig2_0.png", "fig2_0.svg", "fig2_1.png", "compare.png", "compare.svg", "table1.md", "table1.csv",
            "curve_0.csv", "figure_data.json"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    data = json.loads((out / "figure_data.json").read_text())
    rows = [read_jsonl(p / "metrics.jsonl") for p in paths[:2]]
    group = data["fig2_0"]["groups"][0]
    assert group["label"] == "hidden=(256, 256)" and len(group["runs"]) == 2
    want = [statistics.fmean(r[i]["test_acc"] for r in rows) * 100 for i in range(4)]
    assert group["test_acc_pct"] == pytest.approx(want)
    assert group["remaining_pct"] == pytest.approx([(1 - rows[0][i]["sparsity"]) * 100 for i in range(4)])
    assert data["fig2_0"]["entropy"]["entropy_bits"] == pytest.approx(
        [statistics.fmean(r[i]["entropy_mean"] for r in rows) for i in range(4)])
    assert len(group["phases"]) == 4 and len(data["compare"]["groups"]) == 2
    table = list(csv.DictReader(open(out / "table1.csv")))
    full = next(t for t in table if t["configuration"] == "hidden=(256, 256)" and t["loop"] == "full loop")
    pflops = statistics.fmean(sum(x["train_flops_dense"] for x in r) / 1e15 for r in rows)
    assert float(full["train PFLOPs (dense, 1/MAC)"]) == pytest.approx(pflops, rel=1e-5)
    bests = [max(r, key=lambda x: (x["val_acc"], x["sparsity"]))["test_acc"] * 100 for r in rows]
    assert full["test acc (%)"] == f"{statistics.fmean(bests):.2f} ± {statistics.stdev(bests):.2f}"
