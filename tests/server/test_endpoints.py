"""The endpoint routes (``/mlcloud/endpoints``) of a real Jupyter server over a real endpoint
(``mlc.serve`` of a small ``torch.nn.Linear``) on a real local cluster: what they list, scaling,
promote and rollback as the kernel's ``Endpoint`` sees them, the panel's data and page, and the
one sentence every bad request gets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from tornado.httpclient import HTTPClientError

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import discovery
from jupyter_mlcloud.server.handlers import ENDPOINTS_KEY, FEEDS_KEY, LISTS_KEY
from jupyter_mlcloud.serving.api import Endpoint
from tests.conftest import ModuleCluster

CLUSTER = {"name": "endpoint-routes", "workers": 2}
NAME = "linear"
X = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


def linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


@pytest.fixture(scope="module")
def endpoint(module_cluster: ModuleCluster) -> Iterator[Endpoint]:
    ep = mlc.serve(linear(0), name=NAME, cluster=module_cluster.whole(), replicas=1)
    yield ep
    ep.close()


@pytest.fixture
def served(module_cluster: ModuleCluster, endpoint: Endpoint, jp_serverapp: Any,
           jp_asyncio_loop: Any) -> Iterator[Endpoint]:
    """The endpoint, on a cluster the server knows (a discovery file in its runtime dir, as a
    kernel that connected to it writes), back to one version with one replica afterwards."""
    cluster = module_cluster.whole()
    discovery.write(discovery.ClusterRecord(name=cluster.name, kind="remote",
                                            address=cluster.address, status="running"))
    yield endpoint
    settings = jp_serverapp.web_app.settings
    for key in (ENDPOINTS_KEY, LISTS_KEY, FEEDS_KEY):
        jp_asyncio_loop.run_until_complete(settings[key].close())
    discovery.remove(cluster.name)
    while len(endpoint.versions) > 1:
        endpoint.rollback()
    if endpoint.versions[0]["replicas"] != 1:
        endpoint.scale(1)


async def fetch(jp_fetch: Any, *path: str, method: str = "GET", body: Any = None
                ) -> tuple[int, Any]:
    """Status and decoded JSON body of a request (errors included)."""
    if body is None and method == "POST":
        body = "{}"
    elif body is not None and not isinstance(body, str):
        body = json.dumps(body)
    try:
        response = await jp_fetch("mlcloud", *path, method=method, body=body)
    except HTTPClientError as e:
        response = e.response
    return response.code, json.loads(response.body)


async def listed(jp_fetch: Any) -> dict[str, Any]:
    code, body = await fetch(jp_fetch, "endpoints")
    assert code == 200, body
    [entry] = [e for e in body["endpoints"] if e["name"] == NAME]
    return entry


async def stats_until(jp_fetch: Any, check: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The panel's columns once their newest row passes ``check`` (the server samples at most
    every half second, so a row right after another may repeat it)."""
    deadline = time.monotonic() + timeout
    while True:
        code, columns = await fetch(jp_fetch, "endpoints", CLUSTER["name"], NAME, "stats")
        assert code == 200, columns
        if columns["time"] and check(columns):
            return columns
        if time.monotonic() > deadline:
            pytest.fail(f"the endpoint's figures never passed the check: {columns}")
        await asyncio.sleep(0.2)


def weights(entry: dict[str, Any]) -> list[tuple[int, float, int]]:
    return [(v["version"], v["weight"], v["replicas"]) for v in entry["versions"]]


def kernel_weights(ep: Endpoint) -> list[tuple[int, float, int]]:
    return [(v["version"], v["weight"], v["replicas"]) for v in ep.versions]


async def test_lists_the_endpoint_with_versions_replicas_and_live_figures(
        jp_fetch, served: Endpoint) -> None:
    for _ in range(5):
        served.predict(X)
    entry = await listed(jp_fetch)
    assert entry["cluster"] == CLUSTER["name"] and entry["url"] == served.url
    assert entry["reachable"] is True and entry["autoscale"] is None
    assert weights(entry) == kernel_weights(served) and len(weights(entry)) == 1
    assert entry["replicas"] == 1 and entry["workers"] == served.replicas
    assert entry["versions"][0]["workers"] == served.replicas
    assert entry["versions"][0]["source"] == "Linear"
    stats = served.stats()
    assert entry["requests"] == stats["requests"] >= 5 and entry["errors"] == 0
    assert entry["rps"] > 0 and 0 < entry["p50_ms"] <= entry["p99_ms"]
    version = entry["versions"][0]
    assert version["requests"] == entry["requests"] and version["p99_ms"] == entry["p99_ms"]
    assert "token" not in json.dumps(entry) and served.token not in json.dumps(entry)


def test_the_listing_needs_no_default_client(served: Endpoint) -> None:
    # A Jupyter server holds no Dask client of its own (this test process does: its cluster's).
    code = ("import asyncio, json\n"
            "from jupyter_mlcloud.serving.board import Board\n"
            "board = Board()\n"
            "print(json.dumps(asyncio.run(board.list_endpoints())))\n"
            "asyncio.run(board.close())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # the same runtime dir: it finds the cluster
    assert done.returncode == 0, done.stderr[-2000:]
    [entry] = json.loads(done.stdout.strip().splitlines()[-1])["endpoints"]
    assert entry["name"] == NAME and entry["url"] == served.url
    assert entry["requests"] is not None and entry["errors"] == 0  # the router answered


async def test_a_silent_scheduler_is_answered_in_bounded_time(jp_fetch, served: Endpoint
                                                              ) -> None:
    # A scheduler that accepts connections and never answers (as a hung one does).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        discovery.write(discovery.ClusterRecord(
            name="silent", kind="remote", status="running",
            address=f"tcp://127.0.0.1:{silent.getsockname()[1]}"))
        try:
            start = time.monotonic()
            code, body = await asyncio.wait_for(fetch(jp_fetch, "endpoints"), 30)
            assert code == 200 and time.monotonic() - start < 15
            assert body["unreachable"] == ["silent"]
            assert [e["name"] for e in body["endpoints"]] == [NAME]  # the others still listed
            code, body = await fetch(jp_fetch, "endpoints", "silent", NAME, "scale",
                                     method="POST", body={"replicas": 2})
            assert code == 503 and body["message"] == (
                "the scheduler at tcp://127.0.0.1:"
                f"{silent.getsockname()[1]} does not answer; retrying.")
        finally:
            discovery.remove("silent")


async def test_scale_through_the_route_is_what_the_kernel_sees(jp_fetch, served: Endpoint
                                                                ) -> None:
    code, entry = await fetch(jp_fetch, "endpoints", CLUSTER["name"], NAME, "scale",
                              method="POST", body={"replicas": 2})
    assert code == 200 and entry["replicas"] == 2 and weights(entry) == [(1, 1.0, 2)]
    assert sorted(entry["workers"]) == sorted(served.replicas) and len(served.replicas) == 2
    np.testing.assert_allclose(served.predict(X), linear(0)(torch.from_numpy(X)).detach(),
                               rtol=1e-6)
    code, entry = await fetch(jp_fetch, "endpoints", CLUSTER["name"], NAME, "scale",
                              method="POST", body={"replicas": 1})
    assert code == 200 and entry["replicas"] == 1 and len(served.replicas) == 1
    assert (await listed(jp_fetch))["replicas"] == 1


async def test_rollback_and_promote_after_a_canary(jp_fetch, served: Endpoint) -> None:
    path = ("endpoints", CLUSTER["name"], NAME)
    served.update(linear(1), canary=0.5)
    assert weights(await listed(jp_fetch)) == [(1, 0.5, 1), (2, 0.5, 1)]
    before = served.stats()["requests"]
    for _ in range(4):
        served.predict(X)
    columns = await stats_until(jp_fetch, lambda c: c["requests"][-1] >= before + 4)
    assert {"v1_rps", "v2_rps", "v2_p99_ms", "v2_errors"} <= set(columns)
    assert columns["v1_requests"][-1] + columns["v2_requests"][-1] == columns["requests"][-1]
    assert columns["v2_requests"][-1] == 2  # every other request, by weight
    assert len({len(c) for c in columns.values()}) == 1  # a table

    code, entry = await fetch(jp_fetch, *path, "rollback", method="POST")
    assert code == 200 and weights(entry) == [(1, 1.0, 1)]
    assert kernel_weights(served) == [(1, 1.0, 1)]

    served.update(linear(2), canary=0.5)
    code, entry = await fetch(jp_fetch, *path, "promote", method="POST")
    assert code == 200 and weights(entry) == [(3, 1.0, 1)]
    assert kernel_weights(served) == [(3, 1.0, 1)]
    want = linear(2)(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(served.predict(X), want, rtol=1e-6)


async def test_the_endpoint_panel_page_and_its_data(jp_fetch, served: Endpoint) -> None:
    served.predict(X)
    first = await stats_until(jp_fetch, lambda c: c["requests"][-1] >= 1)
    columns = await stats_until(jp_fetch, lambda c: len(c["time"]) > len(first["time"]))
    assert columns["time"] == sorted(columns["time"]) and columns["requests"][-1] >= 1
    assert columns["p50_ms"][-1] > 0 and columns["v1_p99_ms"][-1] > 0

    target = f"{CLUSTER['name']}:{NAME}"
    page = (await jp_fetch("mlcloud", "panels", "endpoint", target)).body.decode()
    assert "endpoint-stats" in page and f"mlcloud/endpoints/{CLUSTER['name']}/{NAME}/stats" in page
    for name in ("figure-rps", "figure-latency", "figure-errors", "v1_p99_ms"):
        assert name in page
    assert served.url in page and "document_ready" in page  # what it is; the poller
    assert "mlcloud/bokeh/static/js/bokeh.min.js" in page and "cdn.bokeh" not in page


@pytest.mark.parametrize(("method", "path", "body", "code", "message"), [
    ("POST", ["scale"], {"replicas": 0}, 400, "replicas must be an integer >= 1, got 0."),
    ("POST", ["scale"], {"replicas": "2"}, 400, "replicas must be an integer >= 1, got '2'."),
    ("POST", ["scale"], {"replicas": True}, 400, "replicas must be an integer >= 1, got True."),
    ("POST", ["scale"], {"workers": 2}, 400, 'send {"replicas": N}.'),
    ("POST", ["scale"], "{replicas", 400, "the request body is not JSON."),
    ("POST", ["ghost", "scale"], {"replicas": 2}, 404,
     f"no endpoint 'ghost' on cluster '{CLUSTER['name']}'."),
    ("POST", ["ghost", "promote"], None, 404, "no endpoint 'ghost' on cluster"),
    ("POST", ["ghost", "rollback"], None, 404, "no endpoint 'ghost' on cluster"),
    ("GET", ["ghost", "stats"], None, 404, "no endpoint 'ghost' on cluster"),
    ("POST", ["~nocluster", "scale"], {"replicas": 2}, 404, "no cluster named 'nocluster'."),
    ("GET", ["~nocluster", "stats"], None, 404, "no cluster named 'nocluster'."),
])
async def test_bad_requests_get_one_sentence(jp_fetch, served: Endpoint, method: str,
                                             path: list[str], body: Any, code: int,
                                             message: str) -> None:
    before = kernel_weights(served)
    if path[0] == "~nocluster":
        where = ["nocluster", NAME, *path[1:]]
    elif len(path) == 2:
        where = [CLUSTER["name"], *path]
    else:
        where = [CLUSTER["name"], NAME, *path]
    answered, reply = await fetch(jp_fetch, "endpoints", *where, method=method, body=body)
    assert answered == code and reply["message"].startswith(message), reply
    assert "Traceback" not in json.dumps(reply) and "\n" not in reply["message"]
    assert kernel_weights(served) == before  # nothing was changed


async def test_rolling_back_the_only_version_there_ever_was_is_refused(
        jp_fetch, served: Endpoint, module_cluster: ModuleCluster) -> None:
    only = mlc.serve(linear(0), name="only", cluster=module_cluster.whole(), replicas=1)
    try:
        code, reply = await fetch(jp_fetch, "endpoints", CLUSTER["name"], "only", "rollback",
                                  method="POST")
        assert code == 400 and reply["message"] == (
            "endpoint 'only' has only version 1: there is nothing to roll back to.")
        assert kernel_weights(only) == [(1, 1.0, 1)]
        code, entry = await fetch(jp_fetch, "endpoints", CLUSTER["name"], "only", "promote",
                                  method="POST")  # nothing newer: nothing changes
        assert code == 200 and weights(entry) == [(1, 1.0, 1)]
        names = [e["name"] for e in (await fetch(jp_fetch, "endpoints"))[1]["endpoints"]]
        assert names == [NAME, "only"]
    finally:
        only.close()
    names = [e["name"] for e in (await fetch(jp_fetch, "endpoints"))[1]["endpoints"]]
    assert names == [NAME]


@pytest.mark.parametrize(("target", "code", "message"), [
    (f"{CLUSTER['name']}:ghost", 404,
     f"no endpoint &#x27;ghost&#x27; on cluster &#x27;{CLUSTER['name']}&#x27;."),
    ("nocluster:linear", 404, "no cluster named &#x27;nocluster&#x27;."),
    ("linear", 400, "is not an endpoint; give CLUSTER:NAME"),
])
async def test_panels_of_endpoints_that_do_not_exist_say_so(jp_fetch, served: Endpoint,
                                                            target: str, code: int,
                                                            message: str) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("mlcloud", "panels", "endpoint", target)
    page = err.value.response.body.decode()
    assert err.value.code == code and "mlcloud-panel-message" in page and message in page
    assert "Traceback" not in page


async def test_a_watched_endpoint_is_listed_with_its_drift_and_alerts(
        module_cluster: ModuleCluster, served: Endpoint, jp_fetch: Any) -> None:
    rng = np.random.default_rng(3)
    ep = mlc.serve(linear(1), name="route-watched", cluster=module_cluster.whole(),
                   reference=rng.normal(size=(1000, 4)), monitor={"rows": 200, "every_s": 0.5})
    try:
        moved = rng.normal(size=(200, 4)).astype(np.float32)
        moved[:, 1] += 3.0
        for start in range(0, 200, 4):
            await asyncio.get_running_loop().run_in_executor(None, ep.predict,
                                                             moved[start:start + 4])
        deadline = time.monotonic() + 60
        while True:
            code, body = await fetch(jp_fetch, "endpoints")
            assert code == 200, body
            [entry] = [e for e in body["endpoints"] if e["name"] == "route-watched"]
            if entry["alerts"] and entry["drift"]:
                break
            assert time.monotonic() < deadline, f"no drift listed: {entry}"
            await asyncio.sleep(0.3)
        assert entry["watched"] and "input_1" in entry["drift"]["drifted"]
        assert entry["drift"]["top"][0][0] in ("input_1", "output_0", "output_1")
        newest = entry["alerts"][-1]
        assert newest["kind"] == "drift" and "input_1" in newest["message"]
        [plain] = [e for e in body["endpoints"] if e["name"] == NAME]
        assert not plain["watched"] and plain["alerts"] == []
        deadline = time.monotonic() + 30
        while True:  # the panel's drift columns, from the sampled check
            code, columns = await fetch(jp_fetch, "endpoints", CLUSTER["name"],
                                        "route-watched", "stats")
            assert code == 200, columns
            if columns["drifted_features"] and (columns["drifted_features"][-1] or 0) >= 1:
                break
            assert time.monotonic() < deadline, f"no drift in the panel's columns: {columns}"
            await asyncio.sleep(0.3)
        assert columns["largest_effect"][-1] > 1.0
        # Drift per feature: the input that moved has its own line, named in the page.
        assert columns["effect:input_1"][-1] > 1.0
        target = f"{CLUSTER['name']}:route-watched"
        page = (await jp_fetch("mlcloud", "panels", "endpoint", target)).body.decode()
        assert "effect:input_1" in page and "drifted features" in page
    finally:
        ep.close()
