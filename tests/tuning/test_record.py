"""Studies read back from a real MLflow SQLite store: what the sidebar lists of each."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_mlcloud.tuning import record
from tests.tuning.conftest import make_study


def test_studies_count_trials_by_state_with_the_best_value_so_far(client: Any) -> None:
    assert record.studies() == []
    old, _ = make_study(client, "old", [{"state": "COMPLETE", "value": 0.5}], status="FINISHED")
    parent, children = make_study(client, "live", [
        {"state": "COMPLETE", "value": 2.0, "x": 1.5, "run_id": "a1", "cost": 0.25},
        {"state": "PRUNED", "x": 7.0, "run_id": "b2", "cost": 0.5},
        {"state": "FAIL", "x": 3.0},
        {"state": "COMPLETE", "value": 1.25, "x": 0.5, "run_id": "c3"},
        {"state": None, "x": 9.0, "run_id": "d4"},  # still running: not tagged yet
    ])
    live, finished = record.studies()  # newest first
    assert (live["name"], live["mlflow_run_id"], live["state"]) == ("live", parent, "running")
    assert live["counts"] == {"complete": 2, "pruned": 1, "failed": 1, "preempted": 0,
                              "running": 1}
    assert (live["best_value"], live["direction"], live["metric"]) == (1.25, "minimize", "loss")
    assert live["cost"] == pytest.approx(0.75) and live["n_trials"] == 5
    assert (finished["mlflow_run_id"], finished["state"]) == (old, "finished")
    assert finished["best_value"] == 0.5 and finished["cost"] is None
    assert [s["name"] for s in record.studies(max_studies=1)] == ["live"]

    one = record.study(parent)
    assert one["space"] == ["x"]
    assert [(t["number"], t["state"], t["value"], t["run_id"]) for t in one["trials"]] == [
        (0, "complete", 2.0, "a1"), (1, "pruned", None, "b2"), (2, "failed", None, ""),
        (3, "complete", 1.25, "c3"), (4, "running", None, "d4")]
    assert one["trials"][0]["params"] == {"x": "1.5"}  # the study's values, not run options
    assert [t["mlflow_run_id"] for t in one["trials"]] == children


def test_a_maximized_study_takes_the_largest_value(client: Any) -> None:
    make_study(client, "up", [{"state": "COMPLETE", "value": v} for v in (0.5, 0.75, 0.25)],
               direction="maximize")
    [study] = record.studies()
    assert study["best_value"] == 0.75


def test_bad_study_ids_get_one_sentence(client: Any, experiment: str) -> None:
    with pytest.raises(ValueError, match="study 'not-an-id' is not an MLflow run id"):
        record.study("not-an-id")
    with pytest.raises(LookupError, match=f"no study with MLflow run id {'ab' * 16!r}"):
        record.study("ab" * 16)
    run = client.create_run(client.create_experiment(experiment)).info.run_id
    with pytest.raises(LookupError, match=f"MLflow run '{run}' is not a study"):
        record.study(run)
    with pytest.raises(ValueError, match="max_studies must be a whole number >= 1, got 0"):
        record.studies(0)
