"""The pipeline routes (``/mlcloud/pipelines``, a run's graph and its page) of a real Jupyter
server over runs of a real pipeline recorded in the session's MLflow store."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests.pipelines.conftest import nightly


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


async def fetch(jp_fetch: Any, *path: str, **params: str) -> tuple[int, str]:
    try:
        response = await jp_fetch("mlcloud", *path, params=params)
    except HTTPClientError as e:
        response = e.response
    return response.code, response.body.decode()


async def test_pipelines_their_runs_and_a_runs_graph_page(
        jp_fetch: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"t-{uuid.uuid4().hex[:10]}")
    name = f"t-{uuid.uuid4().hex[:10]}"
    assert await fetch(jp_fetch, "pipelines") == (200, json.dumps({"pipelines": []}))
    fail = tmp_path / "fail"
    fail.touch()
    result = nightly(tmp_path, name, [], fail=fail).run()

    code, body = await fetch(jp_fetch, "pipelines")
    [listed] = json.loads(body)["pipelines"]
    [run] = listed["runs"]
    assert code == 200 and (listed["name"], run["mlflow_run_id"]) == (name, result.mlflow_run_id)
    assert [(s["name"], s["state"]) for s in run["steps"]] == [
        ("prepare", "done"), ("train", "failed"), ("evaluate", "not-run"),
        ("register", "not-run")]
    assert run["steps"][0]["duration"] == pytest.approx(result["prepare"].duration)

    code, body = await fetch(jp_fetch, "pipelines", "runs", result.mlflow_run_id)
    assert code == 200
    assert json.loads(body)["edges"] == [["prepare", "train"], ["train", "evaluate"],
                                         ["evaluate", "register"]]

    code, page = await fetch(jp_fetch, "panels", "pipeline", result.mlflow_run_id)
    assert code == 200 and "<svg class='mlcloud-pipeline-graph'" in page
    assert "<g class='step' data-step='train' data-state='failed'>" in page
    assert "data-from='prepare' data-to='train'" in page
    assert "RuntimeError: the training diverged" in page
    assert "http-equiv='refresh'" not in page  # the run has ended


@pytest.mark.parametrize(("path", "params", "status", "sentence"), [
    (("pipelines", "runs", "nope"), {}, 400, "pipeline run 'nope' is not an MLflow run id"),
    (("pipelines", "runs", "cd" * 16), {}, 404, "no pipeline run with MLflow run id"),
    (("pipelines",), {"max_runs": "-1"}, 400,
     "max_runs must be a whole number from 1 to 100, got '-1'."),
    (("panels", "pipeline", "cd" * 16), {}, 404, "no pipeline run with MLflow run id"),
])
async def test_bad_pipeline_requests_get_one_sentence(jp_fetch: Any, path: tuple[str, ...],
                                                      params: dict[str, str], status: int,
                                                      sentence: str) -> None:
    code, body = await fetch(jp_fetch, *path, **params)
    assert code == status and sentence in body and "Traceback" not in body
