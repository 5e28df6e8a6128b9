"""Pipeline runs read back from the session's real MLflow store, as the sidebar lists them:
each run's steps with their states and durations, and one run's step graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jupyter_mlcloud.pipelines import pipeline, record
from tests.pipelines.conftest import nightly


def _ours(name: str) -> dict[str, Any]:
    [found] = [p for p in record.runs() if p["name"] == name]
    return found


def test_runs_list_each_steps_state_and_duration_and_the_graph(tmp_path: Path,
                                                                name: str) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    first = nightly(tmp_path, name, [], fail=fail).run()
    fail.unlink()
    second = nightly(tmp_path, name, []).run()

    listed = _ours(name)["runs"]
    assert [r["mlflow_run_id"] for r in listed] == [second.mlflow_run_id, first.mlflow_run_id]
    assert [r["status"] for r in listed] == ["finished", "failed"]
    states = [[(s["name"], s["state"]) for s in r["steps"]] for r in listed]
    assert states == [
        [("prepare", "cached"), ("train", "done"), ("evaluate", "done"), ("register", "done")],
        [("prepare", "done"), ("train", "failed"), ("evaluate", "not-run"),
         ("register", "not-run")]]
    for run, result in zip(listed, (second, first), strict=True):
        for step in run["steps"]:
            assert step["duration"] == pytest.approx(result[step["name"]].duration)
    assert listed[1]["steps"][1]["error"] == "RuntimeError: the training diverged"
    assert [p["name"] for p in record.runs(max_pipelines=1)] == [name]
    assert len(record.runs(max_runs=1)[0]["runs"]) == 1

    graph = record.run_graph(second.mlflow_run_id)
    assert graph["edges"] == [["prepare", "train"], ["train", "evaluate"],
                              ["evaluate", "register"]]
    assert [(s["name"], s["depth"]) for s in graph["steps"]] == [
        ("prepare", 0), ("train", 1), ("evaluate", 2), ("register", 3)]


def test_a_running_step_is_listed_running_and_the_next_pending(tmp_path: Path,
                                                                name: str) -> None:
    pipe = pipeline(name, root=tmp_path)
    seen: dict[str, Any] = {}

    @pipe.step(outputs=["n"])
    def probe() -> int:  # reads the listing while it runs
        [run] = _ours(name)["runs"]
        seen.update({s["name"]: s["state"] for s in run["steps"]}, status=run["status"])
        return 1

    @pipe.step(inputs=["n"], outputs=["m"])
    def after(n: int) -> int:
        return n + 1

    assert pipe.run().ok
    assert seen == {"probe": "running", "after": "pending", "status": "running"}


def test_bad_values_get_one_sentence(name: str) -> None:
    with pytest.raises(ValueError, match="pipeline run 'nope' is not an MLflow run id"):
        record.run_graph("nope")
    with pytest.raises(LookupError, match=f"no pipeline run with MLflow run id {'cd' * 16!r}"):
        record.run_graph("cd" * 16)
    with pytest.raises(ValueError, match="max_runs must be a whole number from 1 to 100, got 0"):
        record.runs(max_runs=0)
