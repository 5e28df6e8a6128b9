"""Watching a served model on real workers over real HTTPS: drift of the traffic against the
reference, an alert when a feature moves (an event the kernel's callback gets), and quality
from labels sent back later."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving.api import Endpoint
from tests.conftest import ModuleCluster, wait_for

CLUSTER = {"name": "watch-tests", "workers": 2}
RNG = np.random.default_rng(11)
REFERENCE = RNG.normal(size=(3000, 4)).astype(np.float32)


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


@pytest.fixture(scope="module")
def endpoint(module_cluster: ModuleCluster) -> Iterator[Endpoint]:
    ep = mlc.serve(classifier(), name="watched", cluster=module_cluster.whole(), replicas=2,
                   reference=REFERENCE, monitor={"rows": 400, "every_s": 0.5})
    yield ep
    ep.close()


def send(ep: Endpoint, rows: np.ndarray, per_request: int = 2) -> list[str]:
    ids = []
    for start in range(0, len(rows), per_request):
        _, request_id = ep.predict(rows[start:start + per_request], return_id=True)
        ids.append(request_id)
    return ids


def test_traffic_like_the_reference_does_not_drift_then_a_moved_feature_alerts(
        endpoint: Endpoint) -> None:
    alerts: list[dict[str, Any]] = []
    arrived = threading.Event()

    def on_alert(alert: dict[str, Any]) -> None:
        alerts.append(alert)
        arrived.set()

    endpoint.on_alert(on_alert)
    send(endpoint, RNG.normal(size=(400, 4)).astype(np.float32))
    frame = endpoint.drift()
    assert list(frame.index) == ["input_0", "input_1", "input_2", "input_3", "output_0",
                                 "output_1", "output_2"]
    assert {"psi", "ks_stat", "p_adjusted", "effect", "drifted"} <= set(frame.columns)
    assert not frame["drifted"].any() and (frame["n_current"] == 400).all()

    moved = RNG.normal(size=(400, 4)).astype(np.float32)
    moved[:, 2] += 2.0
    send(endpoint, moved)
    frame = endpoint.drift()
    assert frame.loc["input_2", "drifted"] and frame.loc["input_2", "effect"] > 1.5
    assert not frame.loc[["input_0", "input_1", "input_3"], "drifted"].any()

    assert arrived.wait(60), "no alert reached the callback"
    # One alert per check that finds features newly drifting: as the window fills with moved
    # rows, the outputs may follow input_2 in a later check.
    drifts = [a for a in alerts if a["kind"] == "drift"]
    alert = next(a for a in drifts if "input_2" in a["features"])
    assert drifts[0] is alert and alert["endpoint"] == "watched"
    assert "input_2 (psi" in alert["message"] and alert["version"] == 1
    wait_for(lambda: any(a["kind"] == "drift" for a in endpoint.alerts), 30,
             "the alert in the endpoint's state")

    from jupyter_mlcloud.tracking import store

    def recorded() -> Any:  # in MLflow, by a worker: the endpoint's run and the alert
        client = store.client()
        experiment = client.get_experiment_by_name(store.experiment_name())
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id],
                                  "tags.`mlcloud.endpoint` = 'watched'")
        return runs[0] if runs and "mlcloud.last_alert" in runs[0].data.tags else None

    run = wait_for(recorded, 60, "the alert in MLflow")
    assert "input_2" in run.data.tags["mlcloud.last_alert"]
    assert run.data.metrics["alerts/features"] >= 1


def test_labels_sent_back_later_become_the_versions_accuracy(endpoint: Endpoint) -> None:
    rows = RNG.normal(size=(60, 4)).astype(np.float32)
    ids = send(endpoint, rows, per_request=1)
    with torch.no_grad():
        predicted = classifier()(torch.from_numpy(rows)).argmax(1).numpy()
    labels = predicted.copy()
    labels[:15] = (labels[:15] + 1) % 3  # a quarter wrong
    assert endpoint.feedback(ids, labels.tolist()) == 60
    figures = endpoint.stats()["versions"][1]
    assert figures["labelled"] == 60 and figures["accuracy"] == pytest.approx(0.75)
    assert endpoint.feedback(ids[:5], labels[:5].tolist()) == 0  # joined once only


def test_the_watcher_keeps_each_window_from_the_rows_added_since_its_last_look(
        endpoint: Endpoint, module_cluster: ModuleCluster) -> None:
    from jupyter_mlcloud.serving import control, watch

    client = module_cluster.whole().client
    state = control.read(client, "watched")
    version = control.primary(state)
    kept: dict[str, dict[str, Any]] = {}

    def same_as_whole_windows(followed: list[dict[str, Any]]) -> None:
        whole = watch.traffic(client, state, version)  # each replica's whole window
        assert len(followed) == len(whole) == 2
        for mine, theirs in zip(followed, whole, strict=True):
            for key in ("times", "inputs", "outputs"):
                np.testing.assert_array_equal(mine[key], theirs[key])

    first = watch.follow(client, state, version, kept)
    same_as_whole_windows(first)
    assert sum(len(w["inputs"]) for w in first) > 400  # earlier tests filled both windows
    cursors = {replica: k["written"] for replica, k in kept.items()}
    sent = RNG.normal(size=(30, 4)).astype(np.float32)
    send(endpoint, sent, per_request=3)
    again = watch.follow(client, state, version, kept)
    same_as_whole_windows(again)  # the kept rows, plus the new ones, slid to 400 rows each
    assert sum(kept[r]["written"] - cursors[r] for r in kept) == 30
    added = [w["inputs"][len(w["inputs"]) - (kept[w["replica"]]["written"]
                                              - cursors[w["replica"]]):] for w in again]
    assert sorted(map(tuple, np.concatenate(added).tolist())) == sorted(
        map(tuple, sent.tolist()))
    assert all(len(w["inputs"]) <= 400 for w in again)

    # Rows older than the window's seconds (by the replica's clock) are left out, though kept
    # by count: were the limit raised again, they would count.
    brief = {**state, "monitor": {**state["monitor"],
                                  "window": {**state["monitor"]["window"], "seconds": 1e-9}}}
    assert [len(w["inputs"]) for w in watch.follow(client, brief, version, kept)] == [0, 0]
    assert [len(k["inputs"]) for k in kept.values()] == [len(w["inputs"]) for w in again]


def test_a_check_without_new_traffic_reuses_the_last_drift(endpoint: Endpoint,
                                                            module_cluster: ModuleCluster
                                                            ) -> None:
    from jupyter_mlcloud.serving import control, watch

    client = module_cluster.whole().client
    state = control.read(client, "watched")
    seen: dict[str, Any] = {}
    watch.check(client, state, seen)
    first = seen["frame"]
    watch.check(client, state, seen)
    assert seen["frame"] is first  # nothing came or aged out: not computed again
    send(endpoint, RNG.normal(size=(4, 4)).astype(np.float32))
    watch.check(client, state, seen)
    assert seen["frame"] is not first
    assert seen["summary"]["version"] == 1


def test_monitoring_options_are_checked_in_one_sentence(cluster: Any) -> None:
    with pytest.raises(ValueError, match="monitor= needs a reference= sample"):
        mlc.serve(classifier(), name="unwatched", cluster=cluster, monitor={"rows": 10})
    with pytest.raises(ValueError, match=r"unknown monitor option\(s\) window; allowed:"):
        mlc.serve(classifier(), name="unwatched", cluster=cluster, reference=REFERENCE,
                  monitor={"window": 10})
    assert mlc.endpoints(cluster) == [] or all(e.name != "unwatched"
                                               for e in mlc.endpoints(cluster))


def test_drift_without_a_reference_says_so(cluster: Any) -> None:
    ep = mlc.serve(classifier(), name="blind", cluster=cluster)
    try:
        with pytest.raises(ValueError, match="endpoint 'blind' has no reference to measure"
                                             " drift against; serve it with reference=..."):
            ep.drift()
    finally:
        ep.close()


def test_a_reference_kept_in_training_travels_with_the_registered_model(cluster: Any) -> None:
    x = torch.from_numpy(REFERENCE[:512])
    y = x.sum(1).long() % 3

    def fit(ctx: Any) -> torch.nn.Module:
        model = ctx.prepare(classifier())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in ctx.epochs(2):
            for xb, yb in ctx.shard((x, y), batch_size=32):
                ctx.keep_reference(xb, max_rows=200)
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return model

    run = mlc.train(fit, cluster=cluster)
    run.result(timeout=120)
    assert run.reference is not None and run.reference.values.shape == (200, 4)
    rows = {tuple(r) for r in np.round(REFERENCE[:512].astype(np.float64), 5)}
    assert all(tuple(r) in rows for r in np.round(run.reference.values, 5))  # rows it saw
    mlc.register(run, "kept", alias="prod")
    ep = mlc.serve("models:/kept@prod", name="kept", cluster=cluster)
    try:
        send(ep, RNG.normal(size=(100, 4)).astype(np.float32))
        frame = ep.drift()  # no reference= given: the registered one is used
        assert list(frame.index)[:4] == ["input_0", "input_1", "input_2", "input_3"]
        assert frame.loc["input_0", "n_reference"] == 200
    finally:
        ep.close()
