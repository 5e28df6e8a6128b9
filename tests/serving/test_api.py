"""``mlc.serve`` end to end on real workers over real HTTPS: predictions through the URL
equal the model's own, scaling down and up under load loses no request, closing frees every
port, and another client of the scheduler finds the endpoint and closes it."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from distributed import Client

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import host as worker_side
from jupyter_mlcloud.serving import router as router_side
from jupyter_mlcloud.serving.api import Endpoint
from tests.conftest import ModuleCluster, wait_for
from tests.serving.conftest import expected, make_model, refused, v2_body

CLUSTER = {"name": "endpoint-tests", "workers": 2}
X = np.random.default_rng(2).normal(size=(7, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def endpoint(module_cluster: ModuleCluster, model: torch.nn.Module) -> Iterator[Endpoint]:
    ep = mlc.serve(model, name="digits", cluster=module_cluster.whole(), replicas=2)
    yield ep
    ep.close()


def test_predict_through_the_url_equals_the_model(cluster: Any, endpoint: Endpoint,
                                                  model: torch.nn.Module) -> None:
    assert endpoint.url.startswith("https://127.0.0.1:") and endpoint.token
    assert Path(endpoint.ca_file).read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert sorted(endpoint.replicas) == sorted(cluster.client.scheduler_info()["workers"])
    np.testing.assert_array_equal(endpoint.predict(X), expected(model, X))
    np.testing.assert_array_equal(endpoint.predict(torch.from_numpy(X[0])),
                                  expected(model, X[:1]))
    np.testing.assert_array_equal(endpoint.predict(X.astype(np.float64)), expected(model, X))
    stats = endpoint.stats()
    assert stats["requests"] >= 3 and stats["errors"] == 0


def test_scaling_down_and_up_under_load_loses_no_request(cluster: Any, endpoint: Endpoint,
                                                         model: torch.nn.Module) -> None:
    want = expected(model, X[:2])
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=endpoint.url, timeout=60,
                          headers={"Authorization": f"Bearer {endpoint.token}"},
                          verify=ssl.create_default_context(cafile=endpoint.ca_file)) as c:
            while not stop.is_set() and done[0] < 2000:  # bounded
                got = c.post("/v2/models/digits/infer", json=v2_body(X[:2]))
                if got.status_code != 200:
                    failures.append(f"{got.status_code} {got.text}")
                else:
                    out = np.asarray(got.json()["outputs"][0]["data"], np.float32)
                    # Batched with other requests, float sums may round differently.
                    if not np.allclose(out.reshape(2, 3), want, rtol=1e-5, atol=1e-6):
                        failures.append(f"wrong output {out.tolist()}")
                done[0] += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] >= 20, 30, "load flowing")
        before = list(endpoint.replica_info)
        endpoint.scale(1)
        assert len(endpoint.replicas) == 1
        removed = [r for r in before if r not in endpoint.replica_info]
        assert len(removed) == 1 and refused(removed[0]["url"])  # stopped, port closed
        mark = done[0]
        wait_for(lambda: done[0] >= mark + 20, 30, "load on one replica")
        endpoint.scale(2)
        assert len(endpoint.replicas) == 2
        mark = done[0]
        wait_for(lambda: done[0] >= mark + 20, 30, "load on two replicas again")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert done[0] >= 60
    assert sorted(endpoint.replicas) == sorted(cluster.client.scheduler_info()["workers"])


def test_the_endpoint_is_managed_while_training_holds_every_task_slot(
        cluster: Any, endpoint: Endpoint, model: torch.nn.Module) -> None:
    def hold(gate_name: str) -> None:  # a long task in each worker's only task slot
        from distributed import Event

        Event(gate_name).wait(120)

    from distributed import Event

    release = Event("endpoint-tests-hold", client=cluster.client)
    workers = sorted(cluster.client.scheduler_info()["workers"])
    holds = [cluster.client.submit(hold, "endpoint-tests-hold", workers=[w], pure=False)
             for w in workers]
    try:
        wait_for(lambda: all(f.status == "pending" for f in holds) and all(
            n for n in cluster.client.processing().values()), 30, "both slots to be taken")
        endpoint.scale(1)
        endpoint.scale(2)
        assert endpoint.stats()["errors"] == 0
        np.testing.assert_array_equal(endpoint.predict(X), expected(model, X))
    finally:
        release.set()
        cluster.client.gather(holds)


def _leftovers() -> list[str]:
    return [r.id for r in worker_side.replicas()] + [r.id for r in router_side.routers()]


def test_another_client_finds_the_endpoint_and_closes_it(cluster: Any,
                                                         model: torch.nn.Module) -> None:
    ep = mlc.serve(model, name="shared", cluster=cluster, replicas=2)
    urls = [ep.url] + [r["url"] for r in ep.replica_info]
    other = Client(cluster.address, set_as_default=False)
    try:
        found = {e.name: e for e in mlc.endpoints(other)}
        assert "shared" in found
        rebuilt = found["shared"]
        assert (rebuilt.url, rebuilt.token, sorted(rebuilt.replicas)) == (
            ep.url, ep.token, sorted(ep.replicas))
        np.testing.assert_array_equal(rebuilt.predict(X), expected(model, X))
        rebuilt.close()
        rebuilt.close()  # a no-op
        assert "shared" not in {e.name for e in mlc.endpoints(other)}
    finally:
        other.close()
    assert all(refused(u) for u in urls)
    leftovers = cluster.client.run(_leftovers)
    assert not [i for ids in leftovers.values() for i in ids if i.startswith("shared-")]
    ep.close()  # closed elsewhere already: nothing to do, no error
    with pytest.raises(RuntimeError, match="closed"):
        ep.predict(X)


def test_close_frees_every_port_and_leaves_nothing(cluster: Any,
                                                   model: torch.nn.Module) -> None:
    ep = mlc.serve(model, name="brief", cluster=cluster, replicas=2)
    urls = [ep.url] + [r["url"] for r in ep.replica_info]
    ca_file = ep.ca_file
    assert not any(refused(u) for u in urls)
    ep.close()
    assert all(refused(u) for u in urls)
    for url in urls:  # the ports can be bound again
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", urlsplit(url).port))
    leftovers = cluster.client.run(_leftovers)
    assert not [i for ids in leftovers.values() for i in ids if i.startswith("brief-")]
    assert not Path(ca_file).exists()
    assert "brief" not in {e.name for e in mlc.endpoints(cluster)}
    ep.close()  # twice: a no-op


def test_bad_arguments_fail_early_and_leave_nothing(cluster: Any,
                                                    model: torch.nn.Module,
                                                    endpoint: Endpoint) -> None:
    names = {e.name for e in mlc.endpoints(cluster)}
    with pytest.raises(ValueError, match="an endpoint named 'digits' already runs"):
        mlc.serve(model, name="digits", cluster=cluster)
    with pytest.raises(ValueError, match="replicas must be an integer >= 1, got 0"):
        mlc.serve(model, name="other", cluster=cluster, replicas=0)
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        mlc.serve(model, name="other", cluster=cluster, max_batch_size=0)
    assert {e.name for e in mlc.endpoints(cluster)} == names
    leftovers = cluster.client.run(_leftovers)
    assert not [i for ids in leftovers.values() for i in ids if i.startswith("other-")]
