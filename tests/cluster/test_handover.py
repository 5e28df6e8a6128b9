"""A retiring worker first lets the tasks that hand over end (a real 2-worker LocalCluster):
the scheduler says so on its topic, waits for them up to the grace, and leaves other workers'
retirements as Dask makes them. A run that commits on that word: tests/train/test_preemption.py."""

from __future__ import annotations

import threading
from typing import Any

import dask
import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import handover
from jupyter_mlcloud.cluster import info as cluster_info
from tests.conftest import wait_for

CLUSTER = {"name": "handover-tests", "workers": 2}


def wait_on(name: str) -> None:
    from distributed import Event

    Event(name).wait(60)


def retire_in_background(client: Any, worker: str) -> threading.Thread:
    thread = threading.Thread(target=client.retire_workers, args=([worker],),
                              kwargs={"close_workers": True}, daemon=True)
    thread.start()
    return thread


def test_a_retiring_worker_waits_for_its_handing_over_task_and_says_so(
        cluster: mlc.ClusterHandle) -> None:
    from distributed import Event

    client = cluster.client
    heard: list[dict[str, Any]] = []
    client.subscribe_topic(handover.TOPIC, lambda event: heard.append(event[1]))
    handover.install(client, ("hand-me-",), grace=60)
    try:
        worker = sorted(cluster_info.workers(client))[0]
        release = Event("handover-release", client=client)
        task = client.submit(wait_on, "handover-release", key="hand-me-1", workers=[worker])
        wait_for(lambda: client.processing([worker])[worker], 30, "the task on its worker")
        retiring = retire_in_background(client, worker)
        wait_for(lambda: heard, 30, "the word on the topic")
        assert heard == [{"worker": worker, "grace": 60.0}]
        assert worker in cluster_info.workers(client)  # still there: its task has not ended
        release.set()
        task.result(timeout=30)
        retiring.join(30)
        wait_for(lambda: worker not in cluster_info.workers(client), 30, "the retirement")
    finally:
        client.unregister_scheduler_plugin(handover.NAME)
        client.unsubscribe_topic(handover.TOPIC)


def retired_at_once(client: Any, key: str, grace: float) -> bool:
    """Retire a worker running a task ``key`` that never ends (with ``HandOver`` on, for
    ``hand-me-`` keys); whether the retirement was done within 30 s."""
    handover.install(client, ("hand-me-",), grace=grace)
    try:
        worker = sorted(cluster_info.workers(client))[0]
        task = client.submit(wait_on, "handover-never", key=key, workers=[worker])
        wait_for(lambda: client.processing([worker])[worker], 30, "the task on its worker")
        retire_in_background(client, worker).join(30)
        task.cancel()
        return worker not in cluster_info.workers(client)
    finally:
        client.unregister_scheduler_plugin(handover.NAME)


def test_a_task_that_does_not_end_is_given_the_grace_and_no_more(
        cluster: mlc.ClusterHandle) -> None:
    assert retired_at_once(cluster.client, "hand-me-2", grace=1)


def test_other_tasks_do_not_hold_a_retirement(cluster: mlc.ClusterHandle) -> None:
    assert retired_at_once(cluster.client, "other-1", grace=60)


@pytest.mark.parametrize("grace", [-1, "soon", True])
def test_a_bad_grace_is_refused_in_one_sentence(grace: object) -> None:
    with dask.config.set({"mlcloud.preemption.grace": grace}), \
            pytest.raises(ValueError, match=r"^mlcloud.preemption.grace must be a number of"
                                            r" seconds >= 0, got .*\.$"):
        handover.grace_setting()
