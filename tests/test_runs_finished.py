"""`RunDir.finished`: the one answer to "is this run done?"."""

import json

import pytest

from dsd2.runs import RunDir, RunError


def write_summary(root, **summary):
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary))


def test_no_summary_is_not_finished(tmp_path):
    assert RunDir(tmp_path / "absent").finished("abc") is None
    assert RunDir(tmp_path).finished("abc") is None


def test_finished_needs_the_flag_and_the_same_hash(tmp_path):
    write_summary(tmp_path / "a", run_hash="abc", finished=True, best_level=2)
    write_summary(tmp_path / "b", run_hash="abc", finished=False)
    write_summary(tmp_path / "c", run_hash="abc")
    assert RunDir(tmp_path / "a").finished("abc") == {"run_hash": "abc", "finished": True, "best_level": 2}
    assert RunDir(tmp_path / "a").finished("other") is None
    assert RunDir(tmp_path / "b").finished("abc") is None
    assert RunDir(tmp_path / "c").finished("abc") is None


def test_damaged_summary_is_a_run_error(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        RunDir(tmp_path).finished("abc")
