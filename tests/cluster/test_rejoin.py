"""The rejoin nanny preload: a worker the scheduler dropped for silence comes back; one removed
on purpose does not. (Across hosts, with a real cut link: tests/multihost.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from distributed import Client, LocalCluster

from jupyter_mlcloud.cluster.rejoin import timed_out
from tests.conftest import wait_for


@pytest.fixture
def cluster() -> Iterator[tuple[LocalCluster, Client]]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      preload_nanny=["jupyter_mlcloud.cluster.rejoin"]) as lc, Client(lc) as c:
        c.wait_for_workers(2, timeout=60)
        yield lc, c


def _drop(client: Client, worker: str, as_timed_out: bool) -> None:
    """Remove ``worker`` on the scheduler, as its worker-ttl check does after a failed restart
    (its event first) or as a deliberate removal does (no event)."""
    async def drop(dask_scheduler: Any) -> None:
        if as_timed_out:
            dask_scheduler.log_event("scheduler", {"action": "worker-ttl-timed-out",
                                                   "workers": [worker], "ttl": 5})
        await dask_scheduler.remove_worker(worker, stimulus_id="test-drop")

    client.run_on_scheduler(drop)


def _drop_first(cluster: tuple[LocalCluster, Client], as_timed_out: bool) -> tuple[str, Any]:
    """Drop the first worker (see :func:`_drop`); its address and its nanny."""
    lc, client = cluster
    victim = sorted(client.scheduler_info()["workers"])[0]
    (nanny,) = [n for n in lc.workers.values() if n.worker_address == victim]
    _drop(client, victim, as_timed_out)
    return victim, nanny


def test_a_worker_dropped_for_silence_comes_back_with_the_same_nanny(
        cluster: tuple[LocalCluster, Client]) -> None:
    client = cluster[1]
    victim, nanny = _drop_first(cluster, as_timed_out=True)
    wait_for(lambda: nanny.worker_address not in (None, victim)
             and nanny.worker_address in client.scheduler_info(n_workers=-1)["workers"], 60,
             "a fresh worker in place of the dropped one")
    assert nanny.status.name == "running"
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    assert client.submit(lambda: 6 * 7, workers=[nanny.worker_address]).result(30) == 42


def test_a_worker_removed_on_purpose_closes_with_its_nanny(
        cluster: tuple[LocalCluster, Client]) -> None:
    client = cluster[1]
    victim, nanny = _drop_first(cluster, as_timed_out=False)
    wait_for(lambda: nanny.status.name == "closed", 60, "the nanny to close")
    assert list(client.scheduler_info(n_workers=-1)["workers"]) != [victim]
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1


def test_only_a_ttl_event_naming_the_worker_counts() -> None:
    event = {"action": "worker-ttl-timed-out", "workers": ["tcp://a:1"], "ttl": 5}
    assert timed_out([(1.0, event)], "tcp://a:1")
    assert not timed_out([(1.0, event)], "tcp://b:1")
    assert not timed_out([(1.0, {"action": "restart-workers", "workers": ["tcp://a:1"]}),
                          (2.0, "a plain message")], "tcp://a:1")
