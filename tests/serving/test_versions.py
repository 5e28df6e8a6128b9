"""Versions of an endpoint on real workers over real HTTPS: a canary takes exactly its share,
a version can be asked for by number, rollback and promote move all traffic with no failed
request, per-version figures, and the router's Prometheus route."""

from __future__ import annotations

import collections
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import host as worker_side
from jupyter_mlcloud.serving.api import Endpoint
from tests.conftest import ModuleCluster, wait_for
from tests.serving.conftest import expected, metric, v2_body

CLUSTER = {"name": "version-tests", "workers": 2}
X = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
VERSION = "x-mlcloud-model-version"


def linear(scale: float) -> torch.nn.Module:
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(scale)
        model.bias.zero_()
    return model


@pytest.fixture(scope="module")
def endpoint(module_cluster: ModuleCluster) -> Iterator[Endpoint]:
    ep = mlc.serve(linear(1.0), name="versioned", cluster=module_cluster.whole(), replicas=1)
    yield ep
    ep.close()


def http(ep: Endpoint, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token or ep.token}"} if token != "" else {}
    return httpx.Client(base_url=ep.url, timeout=60, headers=headers,
                        verify=ssl.create_default_context(cafile=ep.ca_file))


def answered_by(ep: Endpoint, n: int, path: str = "/v2/models/versioned/infer"
                ) -> collections.Counter[str]:
    with http(ep) as c:
        counts: collections.Counter[str] = collections.Counter()
        for _ in range(n):
            got = c.post(path, json=v2_body(X))
            assert got.status_code == 200, got.text
            assert got.json()["model_version"] == got.headers[VERSION]
            counts[got.headers[VERSION]] += 1
        return counts


def served_versions(cluster: Any) -> list[str]:
    return sorted(r.version for rs in cluster.client.run(worker_side.replicas).values()
                  for r in rs if r.name == "versioned")


class Load:
    """Requests in a loop from a thread until stopped (bounded); failures and versions seen,
    with the order in which they were answered."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep, self.failures, self.seen = ep, [], []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with http(self.ep) as c:
            while not self._stop.is_set() and len(self.seen) < 5000:
                got = c.post("/v2/models/versioned/infer", json=v2_body(X))
                if got.status_code != 200:
                    self.failures.append(f"{got.status_code} {got.text}")
                else:
                    self.seen.append(got.headers[VERSION])

    def __enter__(self) -> Load:
        self._thread.start()
        wait_for(lambda: len(self.seen) >= 5, 60, "the load to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_a_canary_takes_exactly_its_share_then_rollback_moves_all_traffic_back(
        cluster: Any, endpoint: Endpoint) -> None:
    assert endpoint.versions == [{"version": 1, "weight": 1.0, "replicas": 1}]
    endpoint.update(linear(2.0), canary=0.1, replicas=1)
    assert endpoint.versions == [{"version": 1, "weight": 0.9, "replicas": 1},
                                 {"version": 2, "weight": 0.1, "replicas": 1}]
    assert served_versions(cluster) == ["1", "2"]
    # Smooth weighted round robin: every tenth request, not ten percent on average.
    assert answered_by(endpoint, 200) == {"1": 180, "2": 20}
    np.testing.assert_array_equal(endpoint.predict(X, version=2), expected(linear(2.0), X))
    np.testing.assert_array_equal(endpoint.predict(X, version=1), expected(linear(1.0), X))
    assert answered_by(endpoint, 5, "/v2/models/versioned/versions/2/infer") == {"2": 5}

    stats = endpoint.stats()
    assert stats["versions"][2]["requests"] >= 26 and stats["versions"][2]["weight"] == 0.1
    assert stats["versions"][1]["replicas"] == 1 and stats["errors"] == 0
    for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "batch_size_mean", "batch_size_max"):
        assert stats[key] is not None and stats[key] > 0, key
        assert stats["versions"][2][key] is not None and stats["versions"][2][key] > 0, key
    assert stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]

    with Load(endpoint) as load:
        endpoint.rollback()
        mark = len(load.seen)
        wait_for(lambda: len(load.seen) >= mark + 20, 60, "requests after the rollback")
    assert load.failures == []
    assert set(load.seen[mark:]) == {"1"}  # every request once rollback() returned
    assert endpoint.versions == [{"version": 1, "weight": 1.0, "replicas": 1}]
    assert served_versions(cluster) == ["1"]


def test_promote_retires_the_old_version_and_rollback_starts_it_again(
        cluster: Any, endpoint: Endpoint) -> None:
    endpoint.update(linear(3.0), canary=0.5)
    assert [v["weight"] for v in endpoint.versions] == [0.5, 0.5]
    with Load(endpoint) as load:
        endpoint.promote()
        mark = len(load.seen)
        wait_for(lambda: len(load.seen) >= mark + 10, 60, "requests after the promote")
    assert load.failures == [] and set(load.seen[mark:]) == {"3"}
    assert endpoint.versions == [{"version": 3, "weight": 1.0, "replicas": 1}]
    assert served_versions(cluster) == ["3"]

    endpoint.rollback()  # version 1 has no replica left: it starts again from its model
    assert endpoint.versions == [{"version": 1, "weight": 1.0, "replicas": 1}]
    np.testing.assert_array_equal(endpoint.predict(X), expected(linear(1.0), X))
    assert served_versions(cluster) == ["1"]


def test_a_version_not_served_gets_404_naming_the_live_ones(endpoint: Endpoint) -> None:
    with http(endpoint) as c:
        got = c.post("/v2/models/versioned/versions/9/infer", json=v2_body(X))
    assert got.status_code == 404
    live = ", ".join(str(v["version"]) for v in endpoint.versions)
    assert got.json() == {"error": f"version '9' of model 'versioned' is not served; the"
                                   f" endpoint serves version(s) {live}."}


def test_the_routers_prometheus_route_needs_the_token(endpoint: Endpoint) -> None:
    answered_by(endpoint, 3)
    with http(endpoint, token="") as c:
        assert c.get("/metrics").status_code == 401
    with http(endpoint) as c:
        text = c.get("/metrics").text
    version = str(endpoint.versions[-1]["version"])
    assert metric(text, "mlcloud_router_requests_total", model="versioned", version=version,
                  code="200") >= 3
    assert metric(text, "mlcloud_router_latency_seconds_count", model="versioned",
                  version=version) >= 3


def test_bad_version_arguments_are_refused_in_one_sentence(endpoint: Endpoint) -> None:
    for share in (0, 1.5, "half", True):
        with pytest.raises(ValueError) as caught:
            endpoint.update(linear(1.0), canary=share)  # type: ignore[arg-type]
        assert str(caught.value) == (f"canary must be a share of the traffic in (0, 1], e.g."
                                     f" 0.1, got {share!r}.")
    with pytest.raises(ValueError, match="replicas must be an integer >= 1, got 0."):
        endpoint.update(linear(1.0), canary=0.2, replicas=0)
    assert len(endpoint.versions) == 1  # nothing was started


def test_an_endpoint_serving_an_alias_rolls_out_where_the_alias_moves(cluster: Any) -> None:
    mlc.register(linear(1.0), "follower", alias="prod")
    ep = mlc.serve("models:/follower@prod", name="follower", cluster=cluster, canary=0.5)
    try:
        assert ep.versions == [{"version": 1, "weight": 1.0, "replicas": 1}]
        mlc.register(linear(5.0), "follower", alias="prod")  # version 2 of the registry
        wait_for(lambda: len(ep.versions) == 2, 90, "the moved alias to be rolled out")
        assert ep.versions == [{"version": 1, "weight": 0.5, "replicas": 1},
                               {"version": 2, "weight": 0.5, "replicas": 1}]
        np.testing.assert_array_equal(ep.predict(X, version=2), expected(linear(5.0), X))
        np.testing.assert_array_equal(ep.predict(X, version=1), expected(linear(1.0), X))
    finally:
        ep.close()
