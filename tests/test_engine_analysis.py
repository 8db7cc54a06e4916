"""Entropy, learning distances, FLOPs and early stop inside the level loop."""

import json

import pytest
import torch

from dsd2.analysis.early_stop import StopDecision
from dsd2.cli import main
from dsd2.run import LevelLoop, entropy_of_run
from dsd2.run import loop as loop_module
from dsd2.runs import RunDir, read_jsonl


def quiet_engine(cfg, path):
    return LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None)


@pytest.mark.slow
def test_entropy_distances_and_flops_per_level(tmp_path, tiny_config):
    quiet_engine(tiny_config(), tmp_path / "run").run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for r in rows:
        assert 0.0 <= r["entropy_mean"] <= 1.0 and len(r["entropy_layers"]) == 2
        assert r["entropy_mean"] == pytest.approx(sum(r["entropy_layers"]) / 2, abs=1e-6)
        assert r["dist_from_level_start"] > 0 and r["dist_from_init"] > 0
        assert r["forward_flops_effective"] < r["forward_flops_dense"] or r["level"] == 0
        assert r["train_flops_dense"] == r["epochs"] * 1000 * 3 * r["forward_flops_dense"]
    # MLP 64-256-256-10: 84,480 multiply-adds per image; effective scales with the kept weights
    assert rows[0]["forward_flops_dense"] == 84_480
    assert rows[2]["forward_flops_effective"] == pytest.approx(84_480 * 0.64, rel=1e-3)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["relu_layers"] == ["net.2", "net.4"]
    assert "describe" in summary["phases"]


@pytest.mark.slow
def test_online_entropy_counts_during_the_last_epoch(tmp_path, tiny_config):
    quiet_engine(tiny_config(analysis__entropy="online"), tmp_path / "run").run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(0.0 < r["entropy_mean"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_entropy_command_on_a_run_made_without_the_measure(tmp_path, tiny_config):
    with_measure = tmp_path / "with"
    without = tmp_path / "without"
    quiet_engine(tiny_config(), with_measure).run()
    quiet_engine(tiny_config(analysis__entropy="off"), without).run()
    assert "entropy_mean" not in read_jsonl(without / "metrics.jsonl")[0]
    rows = entropy_of_run(RunDir(without), log=lambda s: None)
    recorded = read_jsonl(with_measure / "metrics.jsonl")
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    # the measure does not change training: the same weights give the same entropies
    assert [r["entropy_mean"] for r in rows] == pytest.approx([r["entropy_mean"] for r in recorded], abs=1e-9)
    assert read_jsonl(without / "entropy.jsonl") == rows
    assert main(["entropy", str(without), "--granularity", "channel"]) == 0


@pytest.mark.slow
def test_engine_really_stops_and_a_rerun_does_not_continue(tmp_path, tiny_config, monkeypatch):
    def stop_at_two(rule, vals, ents, **kw):
        level = len(vals) - 1
        return StopDecision(level >= 2, level, 1, 1, "scripted")

    monkeypatch.setattr(loop_module, "decide", stop_at_two)
    cfg = tiny_config(analysis__early_stop="entropy", prune__levels=6)
    summary = quiet_engine(cfg, tmp_path / "run").run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3
    es = summary["early_stop"]
    assert es["stopped"] and es["stop_level"] == 2 and es["levels_run"] == 3 and es["levels_planned"] == 7
    assert es["train_pflops_saved_dense"] == pytest.approx(4 * 2 * 1000 * 3 * 84_480 / 1e15)
    assert es["returned_level"] == max(rows, key=lambda r: (r["val_acc"], r["sparsity"]))["level"]
    (tmp_path / "run" / "summary.json").unlink()  # killed after stopping, before the summary
    quiet_engine(cfg, tmp_path / "run").run()
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3


# clean labels, so the dense model reaches ~90 % validation accuracy; every level re-draws the weights and barely
# trains them (finetune lr 1e-4 for 2 short epochs): a pruned level is at chance, far below the dense one
COLLAPSING = ["train", "--dense-epochs", "4", "--epochs", "2", "--levels", "3", "--hidden", "32,32", "--lr", "0.01",
              "--noise", "0", "--clean-val", "--perturb", "reinit", "--retrain", "finetune", "--entropy", "off",
              "--early-stop", "val", "--students", "none", "--quiet"]


def test_validation_rule_stops_at_the_first_level_without_improvement(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert main([*COLLAPSING, "--patience", "1", "--out", str(out)]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["level"] for r in rows] == [0, 1]  # the loop really stopped: levels 2 and 3 never ran
    assert rows[0]["val_acc"] > 0.7 and rows[1]["val_acc"] < 0.4
    es = json.loads((out / "summary.json").read_text())["early_stop"]
    assert es["stopped"] and es["stop_level"] == 1 and es["levels_run"] == 2 and es["levels_planned"] == 4
    assert es["returned_level"] == 0


def test_validation_rule_does_not_stop_before_its_patience_runs_out(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert main([*COLLAPSING, "--patience", "4", "--out", str(out)]) == 0  # 3 levels cannot exhaust patience 4
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    assert all(r["val_acc"] < rows[0]["val_acc"] - 0.3 for r in rows[1:])  # no level improved on the dense one
    es = json.loads((out / "summary.json").read_text())["early_stop"]
    assert not es["stopped"] and es["stop_level"] == 3 and es["levels_run"] == es["levels_planned"] == 4
    assert es["returned_level"] == 0 and es["train_pflops_saved_dense"] == 0


def test_entropy_rule_without_the_measure_is_refused(capsys):
    assert main(["train", "--early-stop", "entropy", "--entropy", "off", "--quiet"]) == 2
    assert "needs the entropy measure" in capsys.readouterr().err


@pytest.mark.slow
def test_online_counts_survive_a_kill_before_the_level_is_measured(tmp_path, tiny_config):
    cfg = tiny_config(analysis__entropy="online")
    quiet_engine(cfg, tmp_path / "ref").run()
    engine = quiet_engine(cfg, tmp_path / "killed")
    original = engine.save_state

    def crash_at_level_checkpoint(path, *args, **kwargs):
        if path.name == "level_01.safetensors":
            raise KeyboardInterrupt  # after the last epoch's checkpoint, before the level's measures are saved
        original(path, *args, **kwargs)

    engine.save_state = crash_at_level_checkpoint
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    quiet_engine(cfg, tmp_path / "killed").run()
    ref = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["entropy_mean"] for r in got] == [r["entropy_mean"] for r in ref]
