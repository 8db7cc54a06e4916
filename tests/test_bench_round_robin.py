"""The masked-layer benchmark's round-robin timer on a fake clock: it stops at its minimum when the ratios it is
asked about are tight, takes further rounds while one is wide, and never more than its patience allows."""

import importlib.util
import itertools
from pathlib import Path

import pytest


@pytest.fixture
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ops" / "bench_masked_layers.py"
    spec = importlib.util.spec_from_file_location("bench_masked_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def timed_calls(bench, monkeypatch, b_seconds, **kwargs):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    durations = itertools.cycle(b_seconds)

    def a():
        clock.now += 1.0

    def b():
        clock.now += next(durations)

    return bench._round_robin({"a": a, "b": b}, 0.0, 40, **kwargs)


def test_tight_ratios_stop_at_the_minimum(bench, monkeypatch):
    times = timed_calls(bench, monkeypatch, [1.0, 1.01], pairs=(("a", "b"),))
    assert len(times["a"]) == len(times["b"]) == 40


def test_a_wide_ratio_gets_rounds_until_the_patience_is_spent(bench, monkeypatch):
    times = timed_calls(bench, monkeypatch, [0.5, 2.0], pairs=(("a", "b"),), patience=3.0)
    # the minimum took 40 rounds; three times as long again is 120 more, in steps of 10
    assert 150 <= len(times["a"]) == len(times["b"]) <= 170
    assert len(timed_calls(bench, monkeypatch, [0.5, 2.0], pairs=())["a"]) == 40  # nothing asked: the minimum
