"""One MLflow run, written from a background thread in batches.

The thread that feeds a :class:`Recorder` (a run's metrics subscription, a done callback)
only appends to a queue; a background thread creates the MLflow run, then sends what has
queued once per ``interval`` (:func:`flush_interval`) with one ``log_batch``. When the store
does not answer, the recorder warns once and keeps everything queued until it does, so the
training never waits on MLflow and no point is lost.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import dask

from ..lazy import LazyModule
from . import store

entities = LazyModule("mlflow.entities")

DEFAULT_INTERVAL_S = 5.0
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_PARAM_CHARS = 6000  # MLflow's limit of a param value
RETRY_S = 5.0  # how often an unanswering store is tried again
NICE = 19  # the recording thread's CPU priority: the lowest
STATUSES = ("FINISHED", "FAILED", "KILLED")
_log = logging.getLogger(__name__)

#: A metric as queued: (key, value, step, timestamp in ms).
Point = tuple[str, float, int, int]


class TrackingWarning(UserWarning):
    """The tracking store did not answer or refused something; the run goes on regardless."""


def param_value(value: Any) -> str:
    """A param as MLflow stores it: text, cut to MLflow's length limit."""
    text = value if isinstance(value, str) else repr(value)
    return text[:MAX_PARAM_CHARS]


class Recorder:
    """Records one MLflow run; every method returns at once (the thread does the writing).

    ``name`` is the MLflow run name; ``params`` and ``tags`` are logged when the run is
    created, with tags saying where the code came from (:func:`source_tags`). The store
    (``uri``, default :func:`.store.tracking_uri`) is resolved on the thread too: importing
    MLflow takes a second, which a launch must not wait for. ``sample()``, if given, is
    called every ``sample_every`` seconds while the run is open and returns metrics to log
    (system figures). ``on_created(recorder)`` is called once the MLflow run exists.
    """

    def __init__(
        self,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        uri: str | None = None,
        experiment: str | None = None,
        interval: float | None = None,
        sample: Callable[[], list[tuple[str, float]]] | None = None,
        sample_every: float = 10.0,
        on_created: Callable[[Recorder], None] | None = None,
    ) -> None:
        self.name = name
        self.uri = uri or ""  # resolved on the thread
        self.experiment = experiment or store.experiment_name()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.sent_points = 0
        self._params = {k: param_value(v) for k, v in (params or {}).items() if v is not None}
        self._tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        self._interval = flush_interval() if interval is None else interval
        self._sample, self._sample_every = sample, sample_every
        self._on_created = on_created
        self._points: list[Point] = []
        self._actions: list[tuple[str, Callable[[str], None]]] = []  # (what, fn(run_id))
        self._status: str | None = None
        self._cond = threading.Condition()
        self._created = threading.Event()
        self._done = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ feeding (any thread)

    def log_metrics(self, points: list[Point]) -> None:
        """Queue metrics: ``(key, value, step, timestamp_ms)`` each."""
        with self._cond:
            self._points.extend(points)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (sent after the metrics queued before them)."""
        values = {k: str(v) for k, v in tags.items()}
        self.then("tags", lambda run_id: store.client(self.uri).log_batch(
            run_id, tags=_run_tags(values)))

    def then(self, what: str, action: Callable[[str], None]) -> None:
        """Queue ``action(run_id)`` (an artifact or model upload), after what is queued."""
        with self._cond:
            self._actions.append((what, action))
            self._cond.notify()

    def end(self, status: str) -> None:
        """Queue the end of the MLflow run with ``status`` (FINISHED, FAILED or KILLED)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}.")
        with self._cond:
            self._status = status
            self._cond.notify()

    # ------------------------------------------------------------ waiting

    def created(self, timeout: float | None = None) -> str | None:
        """The MLflow run id once the run exists (None if it did not within ``timeout``)."""
        self._created.wait(timeout)
        return self.run_id

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run has ended in MLflow with everything sent; False on timeout."""
        return self._done.wait(timeout)

    @property
    def pending(self) -> int:
        """Metrics still queued (kept here while the store does not answer)."""
        with self._cond:
            return len(self._points)

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        _yield_to_others()
        try:
            self.uri = self.uri or store.tracking_uri()
            self._tags = {**source_tags(), **self._tags}
        except Exception as e:  # noqa: BLE001 - MLflow is missing or broken here
            self._warn(f"MLflow could not be set up ({e}); nothing of this run is recorded.")
            self._created.set()
            self._done.set()
            return
        next_sample = time.monotonic()
        while True:
            with self._cond:
                if self.run_id is not None:  # the first pass creates the run at once
                    self._cond.wait(self._interval)
                ending = self._status is not None
            if self._sample is not None and not ending and time.monotonic() >= next_sample:
                next_sample = time.monotonic() + self._sample_every
                self._take_sample()
            if not self._send(ending):
                with self._cond:  # the store is away: try again later, nothing dropped
                    self._cond.wait(RETRY_S)
                continue
            if ending or self.run_id is None:  # ended, or never created: nothing more to do
                self._done.set()
                return

    def _take_sample(self) -> None:
        assert self._sample is not None
        try:
            figures = self._sample()
        except Exception:  # noqa: BLE001 - a missing figure must not stop the recording
            return
        now = int(time.time() * 1000)
        self.log_metrics([(k, float(v), 0, now) for k, v in figures])

    def _send(self, ending: bool) -> bool:
        """Create the run if need be, then send the queue; False if the store is away."""
        try:
            if not store.reachable(self.uri):
                raise ConnectionError(f"{self.uri} does not answer")
            if self.run_id is None:
                self._create()
            self._flush_points()
            while True:
                with self._cond:
                    if not self._actions:
                        break
                    what, action = self._actions[0]
                self._act(what, action)
                with self._cond:
                    self._actions.pop(0)
            if ending:
                with self._cond:
                    status = self._status
                store.client(self.uri).set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001 - away (retried) or refused (said once)
            if not store.reachable(self.uri):
                self._warn(f"the tracking store {self.uri} does not answer ({e}); the run goes"
                           " on and its points are kept and sent once the store answers.")
                return False
            if self.run_id is not None:
                self._warn(f"MLflow refused part of run {self.run_id} ({e}).")
                return True
            self._warn(f"could not start an MLflow run in {self.uri} ({e}); this run is not"
                       " recorded, its metrics are still in run.metrics.")
            with self._cond:
                self._points.clear()
                self._actions.clear()
            self._created.set()
            return True
        return True

    def _create(self) -> None:
        mlflow_client = store.client(self.uri)
        self.experiment_id = store.experiment_id(mlflow_client, self.experiment)
        run = mlflow_client.create_run(self.experiment_id, run_name=self.name,
                                       tags=self._tags)
        self.run_id = run.info.run_id
        params = [entities.Param(k, v) for k, v in self._params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            mlflow_client.log_batch(self.run_id, params=params[i:i + 100])
        self._created.set()
        if self._on_created is not None:
            try:
                self._on_created(self)
            except Exception:  # noqa: BLE001 - an announcement is best effort
                _log.debug("on_created of %s failed", self.name, exc_info=True)

    def _flush_points(self) -> None:
        while True:
            with self._cond:
                batch = self._points[:MAX_BATCH]
            if not batch:
                return
            try:
                store.client(self.uri).log_batch(
                    self.run_id,
                    metrics=[entities.Metric(k, v, ts, step) for k, v, step, ts in batch])
            except Exception as e:
                if not store.reachable(self.uri):
                    raise
                self._warn(f"MLflow refused {len(batch)} metric(s) of run {self.run_id} ({e}).")
            with self._cond:  # sent: only now are they off the queue
                del self._points[:len(batch)]
                self.sent_points += len(batch)

    def _act(self, what: str, action: Callable[[str], None]) -> None:
        assert self.run_id is not None
        try:
            action(self.run_id)
        except Exception as e:
            if not store.reachable(self.uri):
                raise
            self._warn(f"could not record the {what} of MLflow run {self.run_id} ({e}).")

    def _warn(self, message: str) -> None:
        if not self._warned:  # one warning per run, not one per retry
            self._warned = True
            warnings.warn(message, TrackingWarning, stacklevel=2)
        _log.info(message)


def flush_interval() -> float:
    """Seconds between sends to MLflow: the Dask config key ``mlcloud.tracking.interval``
    (default 5). Each ``log_batch`` costs a transaction and an update of the run's latest
    metrics whatever its size, and on a machine whose cores the ranks share, 1 s batches took
    several times more of the ranks' steps than 5 s ones (``benchmarks/bench_tracking.py``)."""
    value = dask.config.get("mlcloud.tracking.interval", DEFAULT_INTERVAL_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"mlcloud.tracking.interval is {value!r}; it must be a number of"
                         " seconds above 0, e.g. 5.")
    return seconds


def _yield_to_others() -> None:
    """Give the calling thread the lowest CPU priority (Linux schedules threads one by one):
    MLflow's store spends about 0.2 ms of CPU per point, which must never come out of the
    training ranks' time when they share this machine's cores. ``SCHED_IDLE`` runs it only on
    a core nothing else wants, and any waking rank takes the core back at once; where that
    policy is refused, the highest nice value."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except OSError:
            pass


def source_tags() -> dict[str, str]:
    """Where the code came from: the notebook path (a Jupyter kernel's ``JPY_SESSION_NAME``,
    else the script) and the git commit of the working directory, when there is one."""
    tags: dict[str, str] = {}
    notebook = os.environ.get("JPY_SESSION_NAME") or (sys.argv[0] if sys.argv[0] else "")
    if notebook:
        tags["mlflow.source.name"] = notebook
        tags["mlcloud.notebook"] = notebook
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=2, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _run_tags(tags: Mapping[str, str]) -> list[Any]:
    return [entities.RunTag(k, v) for k, v in tags.items()]
