"""What an endpoint costs: each replica from its start to its stop, whatever stopped it."""

from __future__ import annotations

import time
from typing import Any

import dask
import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import usage
from tests.serving.conftest import make_model

CLUSTER = {"name": "usage-tests", "workers": 2}
PRICES = {"cpu-worker": 0.36, "a100": 3.6}  # per hour: 0.0001 and 0.001 a second


def _state(*replicas: dict[str, Any]) -> dict[str, Any]:
    return {"versions": [{"version": 1, "replicas": list(replicas)}]}


def test_stopped_replicas_move_their_seconds_into_usage_and_live_ones_count_so_far() -> None:
    a, b = {"id": "a"}, {"id": "b"}
    usage.started(a, "cpu-worker", at=100.0)
    usage.started(b, "NVIDIA A100-SXM4-80GB", at=110.0)
    state = _state(a, b)
    before = {r["id"]: dict(r) for r in state["versions"][0]["replicas"]}
    state["versions"][0]["replicas"] = [a]  # b stopped at 130
    usage.settle(before, state, at=130.0)
    assert state["usage"] == {"NVIDIA A100-SXM4-80GB": 20.0}
    cost = usage.cost(state, PRICES, at=150.0)  # a: 50 s so far
    assert (cost.worker_seconds, cost.gpu_seconds) == (70.0, 20.0)
    assert cost.cost == pytest.approx(50 * 0.0001 + 20 * 0.001)
    assert usage.cost(state, {}, at=150.0).cost is None  # no price table, no cost


def test_an_endpoints_cost_follows_its_replicas_through_a_scale_down(
        cluster: Any, tracking_store: str) -> None:
    with dask.config.set({"mlcloud.cost.prices": PRICES}):
        opened = time.time()
        ep = mlc.serve(make_model(), name="metered", cluster=cluster, replicas=2)
        try:
            served = time.time()
            ep.scale(1)
            scaled = time.time()
            time.sleep(0.5)  # let the remaining replica run up a measurable time
            before_read, cost, after_read = time.time(), ep.cost, time.time()
            stats_cost = ep.stats()["cost"]
        finally:
            ep.close()
    # Both replicas started between the serve call and its return; one stopped during the
    # scale call, the other still counts at the read.
    low = before_read - served
    high = (scaled - opened) + (after_read - opened)
    assert low <= cost.worker_seconds <= high, (low, cost, high)
    assert cost.gpu_seconds == 0.0
    assert cost.cost == pytest.approx(cost.worker_seconds * 0.0001)
    assert stats_cost["worker_seconds"] >= cost.worker_seconds

    # Closed, the endpoint's MLflow run holds what its replicas held, priced.
    recorded = _endpoint_runs(tracking_store, "metered")
    assert len(recorded) == 1
    metrics = recorded[0].data.metrics
    assert cost.worker_seconds <= metrics["worker_seconds"] <= high + (time.time() - opened)
    assert metrics["gpu_seconds"] == 0.0
    assert metrics["cost"] == pytest.approx(metrics["worker_seconds"] * 0.0001)


def test_an_untracked_endpoint_records_nothing_in_mlflow(cluster: Any,
                                                         tracking_store: str) -> None:
    with pytest.raises(ValueError, match="track must be True or False, got 'no'"):
        mlc.serve(make_model(), name="unmetered", cluster=cluster, track="no")  # type: ignore[arg-type]
    with mlc.serve(make_model(), name="unmetered", cluster=cluster, track=False) as ep:
        assert ep.predict([[1.0, 2.0, 3.0, 4.0]]).shape == (1, 3)
    assert _endpoint_runs(tracking_store, "unmetered") == []


def _endpoint_runs(uri: str, name: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids, f"tags.`mlcloud.endpoint` = '{name}'"))
