"""The tuning-study routes (``/mlcloud/studies``) of a real Jupyter server over the session's
real MLflow SQLite store, each test in an experiment of its own."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests.tuning.conftest import make_study


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"t-{uuid.uuid4().hex[:10]}")
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


async def get(jp_fetch: Any, *path: str, **params: str) -> tuple[int, Any]:
    try:
        response = await jp_fetch("mlcloud", *path, params=params)
    except HTTPClientError as e:
        response = e.response
    return response.code, json.loads(response.body)


async def test_studies_and_a_study_with_its_trials(jp_fetch: Any, client: Any) -> None:
    assert await get(jp_fetch, "studies") == (200, {"studies": []})
    parent, children = make_study(client, "lr-search", [
        {"state": "COMPLETE", "value": 0.5, "run_id": "aa11", "x": 2.5},
        {"state": "PRUNED", "run_id": "bb22"},
        {"state": None, "run_id": "cc33"}])

    code, body = await get(jp_fetch, "studies")
    [study] = body["studies"]
    assert code == 200 and (study["name"], study["mlflow_run_id"]) == ("lr-search", parent)
    assert study["counts"] == {"complete": 1, "pruned": 1, "failed": 0, "preempted": 0,
                               "running": 1}
    assert (study["best_value"], study["state"], study["metric"]) == (0.5, "running", "loss")

    code, body = await get(jp_fetch, "studies", parent)
    assert code == 200 and body["name"] == "lr-search"
    assert [(t["mlflow_run_id"], t["run_id"], t["state"]) for t in body["trials"]] == [
        (children[0], "aa11", "complete"), (children[1], "bb22", "pruned"),
        (children[2], "cc33", "running")]
    assert body["trials"][0]["params"] == {"x": "2.5"} and body["trials"][0]["value"] == 0.5


@pytest.mark.parametrize(("path", "params", "status", "sentence"), [
    (("studies", "no-such-id"), {}, 400, "study 'no-such-id' is not an MLflow run id"),
    (("studies", "ab" * 16), {}, 404, f"no study with MLflow run id {'ab' * 16!r}."),
    (("studies",), {"max": "lots"}, 400, "max must be a whole number from 1 to 100, got 'lots'."),
])
async def test_bad_study_requests_get_one_sentence(jp_fetch: Any, client: Any,
                                                   path: tuple[str, ...], params: dict[str, str],
                                                   status: int, sentence: str) -> None:
    code, body = await get(jp_fetch, *path, **params)
    assert code == status and sentence in body["message"]
    assert "Traceback" not in body["message"]
