"""The recorder against real stores: batches, statuses, and a server that is not there yet."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import dask
import pytest
from mlflow import MlflowClient

from jupyter_mlcloud.tracking.recorder import (
    MAX_BATCH,
    Recorder,
    TrackingWarning,
    flush_interval,
)
from tests.conftest import free_port
from tests.tracking.conftest import mlflow_server


def test_points_params_and_status_arrive_in_batches(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    recorder = Recorder("batches", uri=uri, params={"lr": 0.1, "note": "x" * 7000},
                        tags={"team": "a"}, interval=0.05)
    steps = MAX_BATCH * 2 + 17  # more than one log_batch can carry
    now = int(time.time() * 1000)
    recorder.log_metrics([("loss", 1.0 / (s + 1), s, now) for s in range(steps)])
    recorder.end("KILLED")
    assert recorder.wait(60)
    run = MlflowClient(uri).get_run(recorder.run_id)
    assert run.info.status == "KILLED"
    assert run.data.params["lr"] == "0.1" and len(run.data.params["note"]) == 6000
    assert run.data.tags["team"] == "a" and run.info.run_name == "batches"
    history = MlflowClient(uri).get_metric_history(recorder.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(steps))
    assert recorder.sent_points == steps and recorder.pending == 0


def test_a_bad_status_is_refused_in_one_sentence(tmp_path: Path) -> None:
    recorder = Recorder("bad", uri=f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(ValueError, match="'DONE' is not one of FINISHED, FAILED, KILLED"):
        recorder.end("DONE")
    recorder.end("FINISHED")
    assert recorder.wait(60)


def test_an_unreachable_server_warns_once_and_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder = Recorder("offline", uri=uri, interval=0.05)
        now = int(time.time() * 1000)
        for step in range(3):  # points keep coming while the server is away
            recorder.log_metrics([("loss", float(step), step, now)])
            time.sleep(0.2)
        recorder.end("FINISHED")
        assert not recorder.wait(1)
    tracking = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 1 and uri in str(tracking[0].message)
    assert recorder.run_id is None and recorder.pending == 3

    with mlflow_server(tmp_path / "server", port):  # the server comes up: all goes through
        assert recorder.wait(120)
        client = MlflowClient(uri)
        assert client.get_run(recorder.run_id).info.status == "FINISHED"
        history = client.get_metric_history(recorder.run_id, "loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (0, 0.0), (1, 1.0), (2, 2.0)]


def test_the_recording_thread_runs_only_on_cores_nothing_else_wants() -> None:
    import os
    import threading

    from jupyter_mlcloud.tracking.recorder import _yield_to_others

    seen: list[int] = []

    def record() -> None:
        _yield_to_others()
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=record)
    thread.start()
    thread.join(10)
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the calling thread keeps its policy


def test_points_wait_for_the_configured_interval_and_a_bad_one_is_refused(
        tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'i.db'}"
    with dask.config.set({"mlcloud.tracking.interval": 30}):
        assert flush_interval() == 30.0
        recorder = Recorder("paced", uri=uri)
    try:
        assert recorder.created(60)
        recorder.log_metrics([("loss", 0.5, 1, int(time.time() * 1000))])
        # Only the end sends before the 30 s are up: the point is still queued until then.
        assert not recorder.wait(1.0) and recorder.pending == 1
    finally:
        recorder.end("FINISHED")
    assert recorder.wait(60) and recorder.pending == 0
    assert len(MlflowClient(uri).get_metric_history(recorder.run_id, "loss")) == 1
    for bad in (0, -1, "soon"):
        with dask.config.set({"mlcloud.tracking.interval": bad}), \
                pytest.raises(ValueError, match=f"mlcloud.tracking.interval is {bad!r}"):
            Recorder("bad", uri=uri)
