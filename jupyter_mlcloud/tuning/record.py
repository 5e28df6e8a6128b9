"""A study in MLflow: one parent run for the study, each trial's run a child of it.

The parent is written from the tuning loop (a few small calls per trial); the trials' own
runs are recorded by ``mlc.train`` (``track=``), and this module only adds to each the tags
that make it a child (``mlflow.parentRunId``) and the trial's values as params.
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

PARENT_ATTR = "mlcloud.mlflow_run_id"  # study user attribute: the parent run, for a resume
_log = logging.getLogger(__name__)
entities = LazyModule("mlflow.entities")  # loaded by the first write, not at import


def _tags(values: Mapping[str, str]) -> list[Any]:
    return [entities.RunTag(k, v) for k, v in values.items()]


class StudyRecord:
    """The study's parent MLflow run: its options as params, then per ended trial the best
    value so far and the counts of complete, pruned and failed trials as metrics.

    A resumed study (its parent's id is in ``study.user_attrs``) goes on in the same run.
    When the store does not answer, it warns once and records nothing more; tuning goes on.
    """

    def __init__(self, study: Any, params: Mapping[str, Any]) -> None:
        self.study = study
        self.run_id: str | None = None
        self._warned = False
        try:
            self.uri, self._client = store.open_client()
            self.run_id = self._reopen(study.user_attrs.get(PARENT_ATTR)) or self._create(params)
            study.set_user_attr(PARENT_ATTR, self.run_id)
        except Exception as e:  # noqa: BLE001 - tuning goes on without a record
            self._warn(f"the study is not recorded in MLflow ({e}).")
            self.run_id = None

    def _reopen(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            self._client.update_run(run_id, status="RUNNING")
        except Exception:  # noqa: BLE001 - gone (another store): start a new parent
            return None
        return run_id

    def _create(self, params: Mapping[str, Any]) -> str:
        experiment = store.experiment_id(self._client, store.experiment_name())
        tags = {**source_tags(), "mlcloud.kind": "study",
                "mlcloud.study": self.study.study_name, **context.run_tags()}
        run = self._client.create_run(experiment, run_name=f"study-{self.study.study_name}",
                                      tags=tags)
        context.started(str(run.info.run_id))
        self._client.log_batch(run.info.run_id, params=[
            entities.Param(k, param_value(v)) for k, v in params.items() if v is not None])
        return str(run.info.run_id)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, TrackingWarning, stacklevel=3)
        _log.info(message)

    def trial_ended(self, counts: Mapping[str, int], best: Any) -> None:
        """Log the study's progress after a trial ended (``best``: the best trial or None)."""
        if self.run_id is None:
            return
        now, step = int(time.time() * 1000), sum(counts.values())
        metrics = [entities.Metric(f"trials_{k}", float(v), now, step) for k, v in counts.items()]
        tags = []
        if best is not None:
            metrics.append(entities.Metric("best_value", float(best.value), now, step))
            tags = [entities.RunTag("mlcloud.best_trial", str(best.number)),
                    entities.RunTag("mlcloud.best_params", json.dumps(best.params, default=str))]
        try:
            self._client.log_batch(self.run_id, metrics=metrics, tags=tags)
        except Exception as e:  # noqa: BLE001
            self._warn(f"MLflow refused part of study run {self.run_id} ({e}).")

    def tag_trial(self, run: Any, number: int, state: str, value: float | None = None) -> None:
        """Tag a trial's MLflow run with how the study saw it end (COMPLETE, PRUNED, FAIL,
        PREEMPTED) and its value, and as the parent's child again (:func:`link_trial` queued
        that on the run's recorder, which a trial that ended at once may have closed first)."""
        record = getattr(run, "tracking", None)
        child = record.recorder.run_id if record is not None else None
        if self.run_id is None or child is None:
            return
        try:
            self._client.log_batch(child, tags=_tags({
                "mlcloud.trial_state": state, "mlflow.parentRunId": self.run_id,
                "mlcloud.study": self.study.study_name, "mlcloud.trial": str(number),
                **({} if value is None else {"mlcloud.trial_value": repr(float(value))})}))
        except Exception as e:  # noqa: BLE001
            self._warn(f"could not tag MLflow run {child} ({e}).")

    def end(self, status: str) -> None:
        """End the parent run (FINISHED, FAILED or KILLED)."""
        if self.run_id is None:
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001
            self._warn(f"could not end MLflow run {self.run_id} ({e}).")


def link_trial(run: Any, parent: StudyRecord, study_name: str, number: int,
               params: Mapping[str, Any]) -> None:
    """Make ``run``'s MLflow run (if tracked) a child of the study's parent run, with the
    trial's number and values; queued on the run's own recorder, never waited for here."""
    record = getattr(run, "tracking", None)
    if record is None or parent.run_id is None:
        return
    recorder = record.recorder
    parent_id = parent.run_id

    def write(run_id: str) -> None:
        client = store.client(recorder.uri)
        existing = set(client.get_run(run_id).data.params)
        # A value named like a run option (seed, epochs) is kept apart from the option.
        values = [entities.Param(k if k not in existing else f"trial.{k}", param_value(v))
                  for k, v in params.items()]
        client.log_batch(run_id, params=values, tags=_tags({
            "mlflow.parentRunId": parent_id, "mlcloud.study": study_name,
            "mlcloud.trial": str(number)}))

    recorder.then("trial", write)



#: A trial's MLflow record -> its state as the sidebar shows it.
TRIAL_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
                "PREEMPTED": "preempted"}
MAX_TRIALS = 1000  # trials read per listing; a study with more shows its newest


def _trial_state(run: Any) -> str:
    """complete, pruned, failed or preempted as the study tagged the trial's run; running while
    untagged and open; failed when the run ended before the study could tag it."""
    tagged = run.data.tags.get("mlcloud.trial_state")
    if tagged in TRIAL_STATES:
        return TRIAL_STATES[tagged]
    return "running" if run.info.status in ("RUNNING", "SCHEDULED") else "failed"


def _space(parent: Any) -> list[str]:
    """The names of the study's search space, from its recorded ``space`` param."""
    import ast

    text = parent.data.params.get("space", "")
    try:
        space = ast.literal_eval(text) if text else {}
    except (ValueError, SyntaxError):  # cut at MLflow's param length: none known
        return []
    return [str(k) for k in space] if isinstance(space, dict) else []


def _trial(run: Any, space: list[str], metric: str) -> dict[str, Any]:
    params = run.data.params
    values = {k: params.get(f"trial.{k}", params.get(k)) for k in space}
    value = run.data.tags.get("mlcloud.trial_value")
    state = _trial_state(run)
    if value is None and state == "complete":  # recorded before trials carried their value
        value = run.data.metrics.get(metric)
    metrics = run.data.metrics
    return {"number": int(run.data.tags.get("mlcloud.trial", "-1")),
            "mlflow_run_id": run.info.run_id, "run_id": run.data.tags.get("mlcloud.run_id"),
            "state": state, "value": None if value is None else float(value),
            "params": {k: v for k, v in values.items() if v is not None},
            "started": run.info.start_time, "ended": run.info.end_time,
            "cost": metrics.get("cost"), "worker_seconds": metrics.get("worker_seconds")}


def _children(client: Any, experiment: str, parents: list[str]) -> dict[str, list[Any]]:
    """Parent run id -> its trials' runs, newest first (MLflow's search has no ``IN`` for
    tags: one search per parent)."""
    found: dict[str, list[Any]] = {}
    for parent in parents:
        runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'",
                                  max_results=MAX_TRIALS, order_by=["attributes.start_time DESC"])
        found[parent] = [run for run in runs if "mlcloud.trial" in run.data.tags]
    return found


def _summary(parent: Any, trials: list[dict[str, Any]]) -> dict[str, Any]:
    params = parent.data.params
    direction = params.get("direction", "minimize")
    metric = params.get("metric", "loss")
    counts = dict.fromkeys(("complete", "pruned", "failed", "preempted", "running"), 0)
    for trial in trials:
        counts[trial["state"]] += 1
    values = [t["value"] for t in trials if t["state"] == "complete" and t["value"] is not None]
    best = parent.data.metrics.get("best_value")
    if values:  # the trials' own values are newer than the parent's last metric
        best = min(values) if direction == "minimize" else max(values)
    costs = [t["cost"] for t in trials if t["cost"] is not None]
    seconds = [t["worker_seconds"] for t in trials if t["worker_seconds"] is not None]
    planned = params.get("n_trials")
    return {"name": parent.data.tags.get("mlcloud.study", parent.info.run_name),
            "mlflow_run_id": parent.info.run_id, "experiment_id": parent.info.experiment_id,
            "state": parent.info.status.lower(), "direction": direction, "metric": metric,
            "n_trials": int(planned) if planned and planned.isdigit() else None,
            "counts": counts, "best_value": best,
            "best_trial": parent.data.tags.get("mlcloud.best_trial"),
            "cost": sum(costs) if costs else None,
            "worker_seconds": sum(seconds) if seconds else None,
            "started": parent.info.start_time, "ended": parent.info.end_time}


def studies(max_studies: int = 20) -> list[dict[str, Any]]:
    """The newest ``max_studies`` studies of the store in force, newest first: name, state
    (running, finished, failed, killed), direction, metric, ``counts`` of trials by state
    (complete, pruned, failed, preempted, running), the best value so far, and cost where the
    trials recorded it. ConnectionError when the store does not answer."""
    if isinstance(max_studies, bool) or not isinstance(max_studies, int) or max_studies < 1:
        raise ValueError(f"max_studies must be a whole number >= 1, got {max_studies!r}.")
    _, client = store.open_client()
    experiment = client.get_experiment_by_name(store.experiment_name())
    if experiment is None:
        return []
    experiment_id = str(experiment.experiment_id)
    parents = client.search_runs([experiment_id], "tags.`mlcloud.kind` = 'study'",
                                 max_results=max_studies, order_by=["attributes.start_time DESC"])
    children = _children(client, experiment_id, [p.info.run_id for p in parents])
    out = []
    for parent in parents:
        space, metric = _space(parent), parent.data.params.get("metric", "loss")
        trials = [_trial(run, space, metric) for run in children[parent.info.run_id]]
        out.append(_summary(parent, trials))
    return out


def study(run_id: str) -> dict[str, Any]:
    """One study (as :func:`studies` lists it) by its MLflow run id, with ``trials``: each
    trial's number, MLflow run id, training run id, params, value and state, by number.
    ValueError for a malformed id, LookupError for an id that is no study."""
    client, parent = store.run_of_kind(run_id, "study", "study")
    space, metric = _space(parent), parent.data.params.get("metric", "loss")
    runs = _children(client, parent.info.experiment_id, [run_id])[run_id]
    trials = sorted((_trial(run, space, metric) for run in runs), key=lambda t: t["number"])
    return {**_summary(parent, trials), "space": space, "trials": trials}
