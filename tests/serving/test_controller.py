"""The endpoint controller on the scheduler, with real SIGKILLed workers: the router comes
back at the same URL when its process dies, a replica whose worker died is replaced with no
failed request, and an autoscaled endpoint follows its load up and back down."""

from __future__ import annotations

import os
import signal
import ssl
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import control
from jupyter_mlcloud.serving import router as router_side
from tests.conftest import wait_for, wait_for_workers
from tests.serving.conftest import expected, make_model, v2_body

CLUSTER = {"name": "controller-tests", "workers": 2}
X = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)


def kill_worker(cluster: Any, address: str) -> None:
    """SIGKILL the worker process at ``address`` (its nanny starts a new one)."""
    (pid,) = cluster.client.run(os.getpid, workers=[address]).values()
    os.kill(pid, signal.SIGKILL)


def routers(cluster: Any) -> dict[str, list[Any]]:
    return {w: rs for w, rs in cluster.client.run(router_side.routers).items() if rs}


class Load:
    """One request loop in a thread (bounded); every non-200 answer is kept."""

    def __init__(self, ep: Any, name: str) -> None:
        self.ep, self.name = ep, name
        self.failures: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(base_url=self.ep.url, timeout=60,
                          headers={"Authorization": f"Bearer {self.ep.token}"},
                          verify=ssl.create_default_context(cafile=self.ep.ca_file)) as c:
            while not self._stop.is_set() and self.done < 20_000:
                got = c.post(f"/v2/models/{self.name}/infer", json=v2_body(X))
                if got.status_code != 200:
                    self.failures.append(f"{got.status_code} {got.text}")
                self.done += 1

    def __enter__(self) -> Load:
        self._thread.start()
        wait_for(lambda: self.done >= 5, 60, "the load to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_the_router_comes_back_at_the_same_url_when_its_process_dies(cluster: Any) -> None:
    model = make_model()
    ep = mlc.serve(model, name="phoenix", cluster=cluster, replicas=1)
    try:
        url, old = ep.url, control.read(cluster.client, "phoenix")["router"]["worker"]
        kill_worker(cluster, old)

        def answers() -> bool:
            try:
                return bool(np.array_equal(ep.predict(X), expected(model, X)))
            except Exception:
                return False

        wait_for(answers, 60, "the router to answer again")
        state = control.read(cluster.client, "phoenix")
        assert state["router"]["worker"] != old and ep.url == url
        assert sum(len(rs) for rs in routers(cluster).values()) == 1
        assert ep.versions == [{"version": 1, "weight": 1.0, "replicas": 1}]
    finally:
        ep.close()
        wait_for_workers(cluster, 2)


def test_a_version_short_of_replicas_is_brought_back_to_what_it_was_served_with(
        cluster: Any) -> None:
    wait_for_workers(cluster, 2)
    model = make_model()
    ep = mlc.serve(model, name="refill", cluster=cluster, replicas=2)
    try:
        # As a replacement that failed leaves it: a replica stopped and gone from the list.
        with control.editing(cluster.client, "refill") as state:
            version = control.primary(state)
            gone = version["replicas"].pop()
            control.route(cluster.client, state)
            control.stop_replica(cluster.client, gone)
        assert control.wanted(version) == 2
        wait_for(lambda: len(ep.replicas) == 2 and gone["id"] not in
                 {r["id"] for r in ep.replica_info}, 60, "the missing replica to be started")
        np.testing.assert_array_equal(ep.predict(X), expected(model, X))
        ep.scale(1)  # what a user asks for is what it keeps
        assert control.wanted(control.primary(control.read(cluster.client, "refill"))) == 1
    finally:
        ep.close()


def test_a_replica_whose_worker_dies_is_replaced_with_no_failed_request(cluster: Any) -> None:
    wait_for_workers(cluster, 2)
    ep = mlc.serve(make_model(), name="healing", cluster=cluster, replicas=2)
    try:
        router_worker = control.read(cluster.client, "healing")["router"]["worker"]
        victim = next(r for r in ep.replica_info if r["worker"] != router_worker)
        with Load(ep, "healing") as load:
            kill_worker(cluster, victim["worker"])
            wait_for(lambda: len(ep.replicas) == 2 and victim["id"] not in
                     {r["id"] for r in ep.replica_info}, 90, "a replacement replica")
            mark = load.done
            wait_for(lambda: load.done >= mark + 10, 60, "requests after the replacement")
        assert load.failures == []
        alive = set(cluster.client.scheduler_info()["workers"])
        assert set(ep.replicas) <= alive
        assert set(ep.stats()["replicas"]) == {r["id"] for r in ep.replica_info}
    finally:
        ep.close()
        wait_for_workers(cluster, 2)


class Slow(torch.nn.Module):
    """A model that takes 20 ms a batch, so a few request loops keep replicas busy."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.layer(x)


def test_autoscale_follows_the_load_up_and_back_down_losing_nothing(cluster: Any) -> None:
    cluster.scale(1)  # the second replica needs a worker the cluster does not have yet
    wait_for(lambda: len(cluster.client.scheduler_info()["workers"]) == 1, 60, "one worker")
    ep = mlc.serve(Slow(), name="elastic", cluster=cluster, autoscale="1:2",
                   max_batch_size=1)
    try:
        assert ep.autoscale == (1, 2) and len(ep.replicas) == 1
        ep.set_autoscale("1:2", target=1.5, up_delay_s=1, down_delay_s=2)
        loads = [Load(ep, "elastic") for _ in range(4)]
        for load in loads:
            load.__enter__()
        try:
            # The controller asks for a worker, this kernel's cluster object adds it, and
            # the second replica starts there.
            wait_for(lambda: len(set(ep.replicas)) == 2, 90, "a second replica under load")
        finally:
            for load in loads:
                load.__exit__()
        assert len(cluster.client.scheduler_info()["workers"]) == 2
        wait_for(lambda: len(ep.replicas) == 1, 60, "scaling back down when idle")
        assert [f for load in loads for f in load.failures] == []
        ep.scale(2)  # a manual scale turns autoscaling off
        assert ep.autoscale is None and len(ep.replicas) == 2
    finally:
        ep.close()
        cluster.scale(2)


def test_set_autoscale_refuses_bad_bounds_in_one_sentence(cluster: Any) -> None:
    with pytest.raises(ValueError, match=r"autoscale must look like 'MIN:MAX' \(e.g. '1:4'\),"
                                         r" got '2-4'."):
        mlc.serve(make_model(), name="never", cluster=cluster, autoscale="2-4")
    assert "never" not in control.names(cluster.client)
