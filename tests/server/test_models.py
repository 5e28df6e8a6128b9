"""The model registry routes (``/mlcloud/models``) of a real Jupyter server over a real MLflow
SQLite store: what they list, aliases set through them as MLflow sees them, and the one
sentence every bad request gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An ``MlflowClient`` on a fresh SQLite store, the one the server's routes read too."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def register(client: Any, name: str, losses: list[float]) -> list[str]:
    """One version of ``name`` per loss, each from a run that logged that loss; the run ids."""
    experiment = client.get_experiment_by_name("models") or client.get_experiment(
        client.create_experiment("models"))
    client.create_registered_model(name)
    runs = []
    for loss in losses:
        run = client.create_run(experiment.experiment_id).info.run_id
        client.log_metric(run, "loss", loss)
        client.create_model_version(name, f"runs:/{run}/model", run)
        runs.append(run)
    return runs


async def put_alias(jp_fetch: Any, name: str, alias: str, body: Any) -> tuple[int, Any]:
    try:
        response = await jp_fetch("mlcloud", "models", name, "aliases", alias, method="PUT",
                                  body=body if isinstance(body, str) else json.dumps(body))
    except HTTPClientError as e:
        response = e.response
    return response.code, json.loads(response.body)


async def test_models_lists_every_registered_model_with_versions_runs_and_metrics(
        jp_fetch, client) -> None:
    assert json.loads((await jp_fetch("mlcloud", "models")).body) == {"models": []}

    runs = register(client, "digits", [0.5, 0.25])
    register(client, "air quality", [1.5])
    client.set_registered_model_alias("digits", "champion", "1")
    listed = json.loads((await jp_fetch("mlcloud", "models")).body)["models"]
    assert [m["name"] for m in listed] == ["air quality", "digits"]
    digits = listed[1]
    assert digits["aliases"] == {"champion": 1}
    assert [v["version"] for v in digits["versions"]] == [2, 1]  # newest first
    assert [v["run_id"] for v in digits["versions"]] == runs[::-1]
    assert [v["metrics"] for v in digits["versions"]] == [{"loss": 0.25}, {"loss": 0.5}]
    assert [v["aliases"] for v in digits["versions"]] == [[], ["champion"]]


async def test_an_alias_set_through_the_route_is_what_mlflow_sees(jp_fetch, client) -> None:
    register(client, "digits", [0.5, 0.25])
    code, model = await put_alias(jp_fetch, "digits", "champion", {"version": 2})
    assert code == 200 and model["name"] == "digits" and model["aliases"] == {"champion": 2}
    assert client.get_model_version_by_alias("digits", "champion").version in (2, "2")

    code, model = await put_alias(jp_fetch, "digits", "champion", {"version": 1})  # moved
    assert code == 200 and model["aliases"] == {"champion": 1}
    assert [v["aliases"] for v in model["versions"]] == [[], ["champion"]]
    assert client.get_model_version_by_alias("digits", "champion").version in (1, "1")


async def test_names_with_spaces_reach_the_registry_percent_decoded(jp_fetch, client) -> None:
    register(client, "air quality", [1.5])
    code, model = await put_alias(jp_fetch, "air quality", "challenger", {"version": 1})
    assert code == 200 and model["aliases"] == {"challenger": 1}
    assert client.get_registered_model("air quality").aliases == {"challenger": 1}


@pytest.mark.parametrize(("name", "alias", "body", "code", "message"), [
    ("ghost", "champion", {"version": 1}, 404, "no registered model 'ghost'"),
    ("digits", "champion", {"version": 7}, 404, "has no version '7'"),
    ("digits", "champion", {"version": "2"}, 400, 'send {"version": N}'),
    ("digits", "champion", {"version": True}, 400, 'send {"version": N}'),
    ("digits", "champion", {"version": 0}, 400, 'send {"version": N}'),
    ("digits", "champion", {}, 400, 'send {"version": N}'),
    ("digits", "champion", "[1]", 400, "must be a JSON object"),
    ("digits", "champion", "{version", 400, "not JSON"),
    ("digits", "latest", {"version": 1}, 400, "'latest' alias name .* is reserved"),
    ("digits", "v2", {"version": 1}, 400, "alias name 'v2' is reserved"),
])
async def test_bad_alias_requests_get_one_sentence(jp_fetch, client, name: str, alias: str,
                                                   body: Any, code: int, message: str) -> None:
    import re

    register(client, "digits", [0.5])
    answered, reply = await put_alias(jp_fetch, name, alias, body)
    assert answered == code and re.search(message, reply["message"]), reply
    assert "Traceback" not in json.dumps(reply) and "\n" not in reply["message"]
    assert client.get_registered_model("digits").aliases == {}  # nothing was changed


async def test_a_store_mlflow_cannot_open_is_a_503_with_one_sentence(jp_fetch,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://models")
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("mlcloud", "models")
    reply = json.loads(err.value.response.body)
    assert err.value.code == 503 and reply["message"].startswith("the MLflow store did not answer")
    assert "nosuchstore" in reply["message"] and "Traceback" not in json.dumps(reply)
