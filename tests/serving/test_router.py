"""The router of an endpoint, over real HTTPS on loopback in front of replicas on real
workers: the token is checked at the URL, requests spread over the replicas by least
outstanding requests, tritonclient's binary tensors pass through unchanged, and an infer
whose replica is gone is retried on another one."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import host as worker_side
from jupyter_mlcloud.serving.api import Endpoint
from jupyter_mlcloud.serving.router import RouterSpec
from tests.conftest import ModuleCluster
from tests.serving.conftest import expected, make_model, metric, v2_body

CLUSTER = {"name": "router-tests", "workers": 2}
X = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def endpoint(module_cluster: ModuleCluster, model: torch.nn.Module) -> Iterator[Endpoint]:
    ep = mlc.serve(model, name="mlp", cluster=module_cluster.whole(), replicas=2)
    yield ep
    ep.close()


def http(url: str, ca_file: str, token: str | None) -> httpx.Client:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=url, headers=headers, timeout=60,
                        verify=ssl.create_default_context(cafile=ca_file))


def test_the_token_is_needed_at_the_url_but_for_health(cluster: Any,
                                                       endpoint: Endpoint) -> None:
    for token in (None, "wrong"):
        with http(endpoint.url, endpoint.ca_file, token) as client:
            for method, path in (("POST", "/v2/models/mlp/infer"), ("GET", "/v2/models/mlp"),
                                 ("POST", "/v1/models/mlp:predict"), ("GET", "/nowhere")):
                got = client.request(method, path, json=v2_body(X))
                assert got.status_code == 401, (token, path, got.text)
                assert "bearer token" in got.json()["error"]
            assert client.get("/v2/health/live").status_code == 200
            assert client.get("/v2/health/ready").json() == {"ready": True}


def test_requests_spread_over_both_replicas(cluster: Any, endpoint: Endpoint,
                                            model: torch.nn.Module) -> None:
    assert len({r["worker"] for r in endpoint.replica_info}) == 2  # one per worker
    with http(endpoint.url, endpoint.ca_file, endpoint.token) as client:
        for i in range(10):
            got = client.post("/v2/models/mlp/infer", json=v2_body(X[i % 6:][:1]))
            assert got.status_code == 200, got.text
        v1 = client.post("/v1/models/mlp:predict", json={"instances": X.tolist()})
        assert v1.status_code == 200
        np.testing.assert_array_equal(np.asarray(v1.json()["predictions"], np.float32),
                                      expected(model, X))
    for replica in endpoint.replica_info:
        with http(replica["url"], endpoint.ca_file, endpoint.token) as direct:
            text = direct.get("/metrics").text
        assert metric(text, "mlcloud_serving_requests_total") >= 3, replica
    stats = endpoint.stats()
    assert stats["requests"] >= 11 and stats["errors"] == 0
    assert all(r["requests"] >= 3 for r in stats["replicas"].values())


def test_tritonclient_binary_defaults_through_the_router(cluster: Any, endpoint: Endpoint,
                                                         model: torch.nn.Module) -> None:
    import tritonclient.http as triton

    def auth() -> dict[str, str]:
        return {"Authorization": f"Bearer {endpoint.token}"}

    client = triton.InferenceServerClient(endpoint.url.removeprefix("https://"), ssl=True,
                                          ssl_options={"ca_certs": endpoint.ca_file})
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_model_metadata("mlp", headers=auth())["inputs"][0]["shape"] == [-1, 4]
        for i in range(4):  # both replicas answer in turn
            tensor = triton.InferInput("input", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            result = client.infer("mlp", [tensor], headers=auth(), request_id=f"t-{i}")
            np.testing.assert_array_equal(result.as_numpy("output"), expected(model, X))
            response = result.get_response()
            assert response["id"] == f"t-{i}" and response["model_version"] == "1"
            assert response["outputs"][0]["parameters"]["binary_data_size"] == 6 * 3 * 4
        with pytest.raises(triton.InferenceServerException, match="bearer token"):
            client.infer("mlp", [tensor])
    finally:
        client.close()


def test_an_infer_is_retried_when_a_replica_is_gone(cluster: Any,
                                                    model: torch.nn.Module) -> None:
    ep = mlc.serve(model, name="flaky", cluster=cluster, replicas=2)
    try:
        victim = ep.replica_info[0]
        # Behind the router's back: it still lists the replica, whose port is now closed.
        assert cluster.client.submit(worker_side.stop_replica, victim["id"], pure=False,
                                     workers=[victim["worker"]]).result(60)
        for i in range(12):
            np.testing.assert_array_equal(ep.predict(X[i % 6:][:2]),
                                          expected(model, X[i % 6:][:2]))
        stats = ep.stats()
        assert stats["errors"] == 0 and stats["requests"] == 12
        assert stats["retries"] >= 1  # the gone replica was tried and another answered
        assert stats["replicas"][victim["id"]]["errors"] >= 1
    finally:
        ep.close()


def test_the_infer_fast_path_answers_as_the_other_routes(cluster: Any, endpoint: Endpoint,
                                                        model: torch.nn.Module) -> None:
    body = v2_body(X)
    with http(endpoint.url, endpoint.ca_file, endpoint.token) as client:
        fast = client.post("/v2/models/mlp/infer", json=body)  # raw ASGI
        version = endpoint.versions[0]["version"]
        routed = client.post(f"/v2/models/mlp/versions/{version}/infer", json=body)  # Starlette
        for got in (fast, routed):
            assert got.status_code == 200, got.text
            assert got.headers["x-mlcloud-model-version"] == str(version)
            assert got.headers["content-type"].startswith("application/json")
            np.testing.assert_array_equal(
                np.asarray(got.json()["outputs"][0]["data"], np.float32).reshape(len(X), -1),
                expected(model, X))
        # The replica's own refusal passes through unchanged.
        wrong = client.post("/v2/models/other/infer", json=body)
        assert wrong.status_code == 404 and "serves 'mlp'" in wrong.json()["error"]
        # An oversize body is refused at the router, before any replica sees it.
        limit = RouterSpec.max_body_bytes
        too_big = client.post("/v2/models/mlp/infer", content=b"0" * (limit + 1),
                              headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and "larger than" in too_big.json()["error"]
