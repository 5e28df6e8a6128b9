"""A pipeline run in MLflow: one parent run, a child run per step, and the cache in their tags.

The parent carries the step graph (``mlcloud.graph``, JSON: step -> the steps it reads from).
A step that runs gets its child before it is called (:meth:`PipelineRecord.open_step`), so the
runs it starts can be that child's children; cached, skipped and not-run steps get theirs when
they are recorded. Each step's child carries ``mlcloud.cache_key`` and ``mlcloud.outputs``
(JSON: every output's value and digest); a step that ran to the end is tagged
``mlcloud.step_state=done``. A later run looks its key up among those children: that is the
whole cache, beside the run records. Writes are synchronous (a handful per step): the cache
lookup must see what the last step wrote. When the store does not answer, the pipeline runs
with nothing cached and warns once.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

from ..lazy import LazyModule
from ..tracking import context, store
from ..tracking.recorder import TrackingWarning, param_value, source_tags

entities = LazyModule("mlflow.entities")
_log = logging.getLogger(__name__)
MAX_TAG = 8000  # MLflow's limit on a tag value
CREATED_WAIT_S = 10.0  # how long a step's end waits for the MLflow runs it started to exist
#: A step's state -> the MLflow status of its child run.
STATUS = {"done": "FINISHED", "cached": "FINISHED", "skipped": "FINISHED",
          "not-run": "KILLED", "failed": "FAILED"}


class PipelineRecord:
    """The parent run of one pipeline run; :meth:`lookup` and :meth:`step` for its steps."""

    def __init__(self, pipeline: str, params: Mapping[str, Any],
                 graph: Mapping[str, list[str]] | None = None) -> None:
        self.pipeline = pipeline
        # The step graph (step -> the steps it reads from), for the run's page.
        edges = json.dumps(dict(graph or {}))
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._warned = False
        self._open: set[str] = set()  # steps' runs opened and not yet recorded
        try:
            self.uri, self._client = store.open_client()
            self.experiment_id = store.experiment_id(self._client, store.experiment_name())
            run = self._client.create_run(
                self.experiment_id, run_name=f"pipeline-{pipeline}",
                tags={**source_tags(), "mlcloud.kind": "pipeline", "mlcloud.pipeline": pipeline,
                      **({"mlcloud.graph": edges} if len(edges) <= MAX_TAG else {})})
            self.run_id = str(run.info.run_id)
            self._params(self.run_id, params)
        except Exception as e:  # noqa: BLE001 - the pipeline runs, uncached and unrecorded
            self._warn(f"pipeline {pipeline!r} is not recorded in MLflow and nothing is reused"
                       f" from its cache ({e}).")
            self.run_id = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, TrackingWarning, stacklevel=3)
        _log.info(message)

    def _params(self, run_id: str, params: Mapping[str, Any]) -> None:
        values = [entities.Param(k, param_value(v)) for k, v in params.items() if v is not None]
        for i in range(0, len(values), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(run_id, params=values[i:i + 100])

    def lookup(self, step: str, key: str) -> dict[str, Any] | None:
        """The newest finished run of ``step`` with cache key ``key``: ``{"run_id",
        "outputs"}``, or None."""
        if self.run_id is None:
            return None
        query = (f"tags.`mlcloud.pipeline` = '{self.pipeline}' and tags.`mlcloud.step` ="
                 f" '{step}' and tags.`mlcloud.cache_key` = '{key}' and"
                 " tags.`mlcloud.step_state` = 'done'")
        try:
            found = self._client.search_runs([self.experiment_id], query, max_results=1,
                                             order_by=["attributes.start_time DESC"])
        except Exception as e:  # noqa: BLE001
            self._warn(f"the cache of pipeline {self.pipeline!r} could not be read ({e}).")
            return None
        if not found:
            return None
        run = found[0]
        try:
            outputs = json.loads(run.data.tags.get("mlcloud.outputs", "{}"))
        except ValueError:
            return None
        return {"run_id": run.info.run_id, "outputs": outputs}

    def _step_tags(self, step: str) -> dict[str, str]:
        assert self.run_id is not None
        return {"mlflow.parentRunId": self.run_id, "mlcloud.kind": "pipeline-step",
                "mlcloud.pipeline": self.pipeline, "mlcloud.step": step}

    def open_step(self, step: str, started: float) -> str | None:
        """Create the child run of a step about to run (RUNNING until :meth:`step`)."""
        if self.run_id is None:
            return None
        try:
            run = self._client.create_run(self.experiment_id, run_name=step,
                                          start_time=int(started * 1000),
                                          tags=self._step_tags(step))
            self._open.add(str(run.info.run_id))
            return str(run.info.run_id)
        except Exception as e:  # noqa: BLE001
            self._warn(f"MLflow refused the record of step {step!r} ({e}).")
            return None

    def started_in(self, step: context.StepContext) -> list[str]:
        """The MLflow runs started while ``step`` ran: those noted in this process, and the
        children of its run made elsewhere (a notebook step's kernel)."""
        found: list[str] = []
        for run in step.started:
            run_id = run if isinstance(run, str) else run.created(CREATED_WAIT_S)
            if run_id and run_id not in found:
                found.append(str(run_id))
        if step.step_run is not None:
            try:
                children = self._client.search_runs(
                    [self.experiment_id], f"tags.`mlflow.parentRunId` = '{step.step_run}'",
                    order_by=["attributes.start_time ASC"])
                found += [str(r.info.run_id) for r in children
                          if str(r.info.run_id) not in found]
            except Exception as e:  # noqa: BLE001
                self._warn(f"the runs of step {step.step!r} could not be listed ({e}).")
        return found

    def step(self, step: str, *, state: str, key: str | None, params: Mapping[str, Any],
             outputs: Mapping[str, Any], duration: float, started: float,
             error: str | None = None, cached_from: str | None = None,
             run_id: str | None = None, runs: list[str] | None = None) -> str | None:
        """Record a step as a child run of the pipeline's run (``run_id``: the one
        :meth:`open_step` made for it); returns its run id. ``runs``: the MLflow runs the
        step started."""
        if self.run_id is None:
            return None
        text = json.dumps(outputs, sort_keys=True, default=str)
        if len(text) > MAX_TAG:  # recorded as an artifact too long to be a tag: not reusable
            text, state_tag = "{}", ("done-uncacheable" if state == "done" else state)
        else:
            state_tag = state
        tags = {**self._step_tags(step),
                "mlcloud.step_state": state_tag, "mlcloud.outputs": text,
                "mlcloud.cache_key": key, "mlcloud.cached_from": cached_from,
                "mlcloud.error": error[-MAX_TAG:] if error else None,
                "mlcloud.step_runs": json.dumps(runs)[:MAX_TAG] if runs else None}
        tags = {k: v for k, v in tags.items() if v is not None}
        try:
            if run_id is None:
                child = str(self._client.create_run(
                    self.experiment_id, run_name=step, start_time=int(started * 1000),
                    tags=tags).info.run_id)
                late = []
            else:  # opened before the step ran: its tags now, in the batch below
                child, late = run_id, [entities.RunTag(k, v) for k, v in tags.items()]
                self._open.discard(run_id)
            # One batch for the params, the duration and the tags: each write is a commit.
            values = [entities.Param(k, param_value(v)) for k, v in params.items()
                      if v is not None]
            self._client.log_batch(child, params=values[:100], tags=late, metrics=[
                entities.Metric("duration_s", float(duration), int(time.time() * 1000), 0)])
            for i in range(100, len(values), 100):  # at most 100 params per batch
                self._client.log_batch(child, params=values[i:i + 100])
            self._client.set_terminated(child, STATUS[state],
                                        end_time=int((started + duration) * 1000))
            return child
        except Exception as e:  # noqa: BLE001
            self._warn(f"MLflow refused the record of step {step!r} ({e}).")
            return None

    def end(self, status: str, states: Mapping[str, str]) -> None:
        """End the parent run with ``status`` and each step's state as a tag."""
        if self.run_id is None:
            return
        try:
            for child in self._open:  # a step interrupted mid-way (Ctrl-C)
                self._client.set_terminated(child, "KILLED")
            self._open.clear()
            self._client.set_tag(self.run_id, "mlcloud.steps", json.dumps(dict(states)))
            self._client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001
            self._warn(f"could not end MLflow run {self.run_id} ({e}).")


def history(pipeline: str, max_runs: int = 10) -> Any:
    """The last ``max_runs`` runs of ``pipeline`` as a DataFrame: run id, start, status and
    each step's state."""
    import pandas as pd

    client = store.client()
    experiment = store.experiment_id(client, store.experiment_name())
    runs = client.search_runs([experiment], f"tags.`mlcloud.kind` = 'pipeline' and"
                              f" tags.`mlcloud.pipeline` = '{pipeline}'", max_results=max_runs,
                              order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        steps = json.loads(run.data.tags.get("mlcloud.steps", "{}"))
        rows.append({"run_id": run.info.run_id, "start": pd.Timestamp(run.info.start_time,
                                                                     unit="ms"),
                     "status": run.info.status, **steps})
    return pd.DataFrame(rows)


MAX_PARENTS = 200  # pipeline runs read per listing, newest first
MAX_STEPS = 1000  # step runs read per pipeline
#: A step's child run with no state tag yet (made when it started) -> its state, by status.
UNTAGGED = {"RUNNING": "running", "SCHEDULED": "running", "FINISHED": "done",
            "FAILED": "failed", "KILLED": "not-run"}
_PENDING = {"state": "pending", "duration": None, "mlflow_run_id": None, "started": None,
            "ended": None, "cached_from": None, "error": None}


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError(f"{name} must be a whole number from 1 to 100, got {value!r}.")
    return value


def _graph(parent: Any) -> dict[str, list[str]]:
    try:
        graph = json.loads(parent.data.tags.get("mlcloud.graph", "{}"))
    except ValueError:
        return {}
    return graph if isinstance(graph, dict) else {}


def _step_entry(run: Any, now_ms: int) -> dict[str, Any]:
    state = run.data.tags.get("mlcloud.step_state") or UNTAGGED.get(run.info.status, "done")
    state = "done" if state == "done-uncacheable" else state
    duration = run.data.metrics.get("duration_s")
    if duration is None and state == "running":  # so far
        duration = max(0.0, (now_ms - run.info.start_time) / 1000)
    error = (run.data.tags.get("mlcloud.error") or "").strip()
    return {"name": run.data.tags.get("mlcloud.step", run.info.run_name), "state": state,
            "duration": duration, "mlflow_run_id": run.info.run_id,
            "started": run.info.start_time, "ended": run.info.end_time,
            "cached_from": run.data.tags.get("mlcloud.cached_from"),
            "error": error.splitlines()[-1] if error else None}


def _run_entry(parent: Any, children: list[Any], now_ms: int) -> dict[str, Any]:
    """A pipeline run as listed: its steps in graph order, those not started yet pending."""
    graph = _graph(parent)
    recorded: dict[str, dict[str, Any]] = {}
    for child in sorted(children, key=lambda r: r.info.start_time):
        entry = _step_entry(child, now_ms)
        recorded[entry["name"]] = entry
    names = list(graph) + [n for n in recorded if n not in graph]
    end = parent.info.end_time
    return {"pipeline": parent.data.tags.get("mlcloud.pipeline"),
            "mlflow_run_id": parent.info.run_id, "experiment_id": parent.info.experiment_id,
            "status": parent.info.status.lower(), "started": parent.info.start_time,
            "ended": end, "duration": ((end or now_ms) - parent.info.start_time) / 1000,
            "steps": [recorded.get(n) or {"name": n, **_PENDING} for n in names],
            "graph": graph}


def runs(max_pipelines: int = 20, max_runs: int = 5) -> list[dict[str, Any]]:
    """The pipelines of the store in force, the most recently run first, each with its last
    ``max_runs`` runs (newest first): status, start, duration and each step's state (pending,
    running, done, cached, skipped, failed, not-run) and duration in seconds.
    ConnectionError when the store does not answer."""
    _count("max_pipelines", max_pipelines)
    _count("max_runs", max_runs)
    _, client = store.open_client()
    experiment = client.get_experiment_by_name(store.experiment_name())
    if experiment is None:
        return []
    experiment_id = str(experiment.experiment_id)
    parents: dict[str, list[Any]] = {}
    for run in client.search_runs([experiment_id], "tags.`mlcloud.kind` = 'pipeline'",
                                  max_results=MAX_PARENTS,
                                  order_by=["attributes.start_time DESC"]):
        name = run.data.tags.get("mlcloud.pipeline", "")
        if name not in parents and len(parents) == max_pipelines:
            continue
        kept = parents.setdefault(name, [])
        if len(kept) < max_runs:
            kept.append(run)
    now_ms = int(time.time() * 1000)
    out = []
    for name, kept in parents.items():
        # One search per pipeline: the steps of its kept runs (none older than the oldest).
        oldest = min(r.info.start_time for r in kept)
        by_parent: dict[str, list[Any]] = {}
        for step in client.search_runs(
                [experiment_id], f"tags.`mlcloud.kind` = 'pipeline-step' and"
                f" tags.`mlcloud.pipeline` = '{name}' and attributes.start_time >= {oldest}",
                max_results=MAX_STEPS):
            by_parent.setdefault(step.data.tags.get("mlflow.parentRunId", ""), []).append(step)
        out.append({"name": name, "runs": [
            _run_entry(r, by_parent.get(r.info.run_id, []), now_ms) for r in kept]})
    return out


def run_graph(run_id: str) -> dict[str, Any]:
    """One pipeline run (as :func:`runs` lists it) with its step graph laid out: each step's
    ``deps`` and ``depth`` (the longest chain of steps it reads from), and the ``edges``
    ``[from, to]``. ValueError for a malformed id, LookupError for one of no pipeline run."""
    client, parent = store.run_of_kind(run_id, "pipeline", "pipeline run")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run_id}' and"
                                  " tags.`mlcloud.kind` = 'pipeline-step'",
                                  max_results=MAX_STEPS)
    found = _run_entry(parent, children, int(time.time() * 1000))
    graph = found["graph"]
    depth: dict[str, int] = {}
    for step in graph:  # the graph came from Pipeline.order(): dependencies come first
        depth[step] = 1 + max((depth.get(d, 0) for d in graph[step] if d in graph), default=-1)
    for step in found["steps"]:
        step["deps"] = [d for d in graph.get(step["name"], []) if d in graph]
        step["depth"] = depth.get(step["name"], 0)
    found["edges"] = [[d, s["name"]] for s in found["steps"] for d in s["deps"]]
    return found
