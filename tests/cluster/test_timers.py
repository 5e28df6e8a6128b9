"""Diagnostic timers quieted beside ranks: overlapping holders, and a run on an mlc.up cluster."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from distributed import Event

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import timers
from tests.conftest import wait_for


def _monitors(cluster: mlc.ClusterHandle) -> list[tuple[bool, float]]:
    """(running, interval in ms) of the system monitor of the scheduler and of each nanny."""
    servers = [cluster.cluster.scheduler, *cluster.cluster.workers.values()]
    return [(s.periodic_callbacks["monitor"].is_running(),
             s.periodic_callbacks["monitor"].callback_time) for s in servers]


def test_the_last_of_two_holders_restores_the_intervals(cluster: mlc.ClusterHandle) -> None:
    before = _monitors(cluster)
    slowed = [(True, max(ms, timers.BESIDE_RANKS["monitor"] * 1000)) for _, ms in before]
    first = timers.quiet_local_cluster(cluster.client)
    second = timers.quiet_local_cluster(cluster.client)
    wait_for(lambda: _monitors(cluster) == slowed, timeout=10, what="the monitors slowed")
    first()
    _drain(cluster)  # the first restore has run on the loop
    assert _monitors(cluster) == slowed
    second()
    wait_for(lambda: _monitors(cluster) == before, timeout=10, what="the monitors restored")


def _drain(cluster: mlc.ClusterHandle) -> None:
    """Return once every callback added to the cluster's loop before this call has run."""
    done = threading.Event()
    cluster.cluster.loop.add_callback(done.set)
    assert done.wait(10)


def test_a_run_quiets_the_monitors_beside_it_until_it_ends(cluster: mlc.ClusterHandle) -> None:
    before = _monitors(cluster)
    slowed = [(True, max(ms, timers.BESIDE_RANKS["monitor"] * 1000)) for _, ms in before]
    assert slowed != before
    gate = Event(f"gate-{uuid.uuid4().hex}", client=cluster.client)

    def fn(ctx: Any, name: str) -> None:
        from distributed import Event

        assert Event(name).wait(timeout=60)

    run = mlc.train(fn, gate.name, cluster=cluster, track=False)
    wait_for(lambda: _monitors(cluster) == slowed, timeout=30, what="the monitors slowed")
    gate.set()
    run.result(timeout=120)
    wait_for(lambda: _monitors(cluster) == before, timeout=30, what="the monitors restored")
