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
from ..tracking import store
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
                "mlcloud.study": self.study.study_name}
        run = self._client.create_run(experiment, run_name=f"study-{self.study.study_name}",
                                      tags=tags)
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

    def tag_trial(self, run: Any, number: int, state: str) -> None:
        """Tag a trial's MLflow run with how the study saw it end (COMPLETE, PRUNED, FAIL),
        and as the parent's child again (:func:`link_trial` queued that on the run's
        recorder, which a trial that ended at once may have closed first)."""
        record = getattr(run, "tracking", None)
        child = record.recorder.run_id if record is not None else None
        if self.run_id is None or child is None:
            return
        try:
            self._client.log_batch(child, tags=_tags({
                "mlcloud.trial_state": state, "mlflow.parentRunId": self.run_id,
                "mlcloud.study": self.study.study_name, "mlcloud.trial": str(number)}))
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

