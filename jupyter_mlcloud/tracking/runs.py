"""What a training run or a scoring job records in MLflow.

A training run is recorded from the kernel, which already receives its metrics events: the
run's listener queues rank 0's points on a :class:`~.recorder.Recorder`, and its done
callback logs the final model and ends the MLflow run with the run's status. Nothing runs on
the workers' training threads.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..cluster import info as cluster_info
from ..lazy import LazyModule
from ..telemetry import events
from . import context, store
from .recorder import Point, Recorder

mlflow_pytorch = LazyModule("mlflow.pytorch")
mlflow_models = LazyModule("mlflow.models")
torch = LazyModule("torch")

#: A training run's final state -> the MLflow run status.
END_STATUS = {"finished": "FINISHED", "error": "FAILED", "cancelled": "KILLED"}
POINT_FIELDS = ("rank", "step", "epoch", "time")
MODEL_NAME = "model"  # the artifact path of a run's logged model


def training_params(options: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every run option by its API name, and the user's ``config`` entries (as ``config.K``
    where K is also an option's name)."""
    params = dict(options)
    for key, value in (config or {}).items():
        params[f"config.{key}" if key in options else str(key)] = value
    return params


def _system_sampler(run: Any) -> Any:
    """Per-rank CPU, memory and GPU figures of the run's workers (those of its current attempt,
    after a recovery too), as MLflow's ``system/`` metrics."""

    def sample() -> list[tuple[str, float]]:
        info = cluster_info.workers(run.client)
        out: list[tuple[str, float]] = []
        for rank, worker in enumerate(list(run.workers)):
            figures = (info.get(worker) or {}).get("metrics") or {}
            gpu = figures.get("gpu") or {}
            prefix = f"system/rank_{rank}_"
            out.append((prefix + "cpu_utilization_percentage", float(figures.get("cpu") or 0)))
            out.append((prefix + "memory_usage_megabytes",
                        float(figures.get("memory") or 0) / 2**20))
            if gpu:
                out.append((prefix + "gpu_utilization_percentage",
                             float(gpu.get("utilization") or 0)))
                out.append((prefix + "gpu_memory_usage_megabytes",
                             float(gpu.get("memory-used") or 0) / 2**20))
        cost = getattr(run, "cost", None)  # worker_seconds, gpu_seconds (and cost), live
        if cost is not None:
            out.extend(cost.as_dict().items())
        return out

    return sample


def points_of(items: list[dict[str, Any]]) -> list[Point]:
    """Rank 0's reported points as MLflow metrics (the other ranks' are in ``run.metrics``)."""
    out: list[Point] = []
    for item in items:
        if item.get("rank") != 0:
            continue
        step, ts = int(item.get("step") or 0), int(float(item.get("time") or time.time()) * 1000)
        out.extend((k, float(v), step, ts) for k, v in item.items()
                   if k not in POINT_FIELDS and isinstance(v, (int, float)))
        if item.get("epoch") is not None:
            out.append(("epoch", float(item["epoch"]), step, ts))
    return out


def find_model(result: Any) -> Any:
    """The ``torch.nn.Module`` in a run's result: the result itself, or in a mapping (the
    ``model`` key first) or a sequence; None if there is none."""
    if "torch" not in sys.modules:  # a module in the result would have loaded torch
        return None
    if isinstance(result, torch.nn.Module):
        return result
    if isinstance(result, Mapping):
        ordered = [result[MODEL_NAME]] if MODEL_NAME in result else []
        candidates = ordered + list(result.values())
    elif isinstance(result, (list, tuple)):
        candidates = list(result)
    else:
        return None
    return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def example_array(example: Mapping[str, Any] | None) -> Any:
    """The input example a rank sent (its first batch's first rows), as a numpy array."""
    if not example:
        return None
    import numpy as np

    return np.asarray(example["data"], dtype=example.get("dtype") or "float32")


class _PickleChoiceFilter(logging.Filter):
    """Drops MLflow's warning against pickled models: pickling is chosen on purpose (see
    :func:`log_model`), and the warning would repeat at the end of every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


#: Where a logged model keeps its reference sample (``mlflow.pytorch``'s ``extra_files``).
REFERENCE_FILE = "reference.npz"


def log_model(run_id: str, model: Any, example: Any, reference: Any = None) -> str:
    """``mlflow.pytorch.log_model`` of ``model`` in run ``run_id``, with a signature
    inferred from ``example`` and the model's output on it, when there is an example, and
    ``reference`` (a ``monitoring.reference.Reference``) as ``extra_files/reference.npz``;
    returns the logged model's URI."""
    logger = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _PickleChoiceFilter) for f in logger.filters):
        logger.addFilter(_PickleChoiceFilter())
    model = model.cpu().eval()
    signature = None
    if example is not None:
        with torch.no_grad():
            output = model(torch.as_tensor(example))
        if isinstance(output, torch.Tensor):
            signature = mlflow_models.infer_signature(example, output.numpy())
    # The logged model belongs to the run's experiment: left to MLflow, it would go to the
    # active experiment (Default), with its files under the working directory.
    mlflow_client = store.client()
    logged = mlflow_client.create_logged_model(
        mlflow_client.get_run(run_id).info.experiment_id, name=MODEL_NAME, source_run_id=run_id)
    with tempfile.TemporaryDirectory(prefix="mlcloud-reference-") as folder:
        extra = []
        if reference is not None:
            extra.append(os.path.join(folder, REFERENCE_FILE))
            np.savez_compressed(extra[0], values=reference.values,
                                names=np.array(reference.names))
        info = mlflow_pytorch.log_model(
            model, name=MODEL_NAME, signature=signature, input_example=example, run_id=run_id,
            model_id=logged.model_id, extra_files=extra or None,
            # Stated, not inferred: inference loads the model in a subprocess (slow, noisy).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            # The module itself, cloudpickled (notebook classes by value): loading gives back
            # what run.result() gave; a pt2 export would need a traceable forward and an example.
            serialization_format="pickle",
        )
    return str(info.model_uri)


class TrainingRecord:
    """Records one training run: params and tags at the start, rank 0's metrics as they come,
    each recovery and checkpoint, the system figures, then the model and the final status."""

    def __init__(self, run: Any, params: Mapping[str, Any], *, cluster: str | None,
                 cluster_kind: str | None) -> None:
        self.run = run
        self.example: Any = None
        self.model_uri: str | None = None  # the logged model, once the run finished
        tags = {"mlcloud.run_id": run.id, "mlcloud.kind": "train", "mlcloud.cluster": cluster,
                "mlcloud.cluster_kind": cluster_kind, **context.run_tags()}
        self.recorder = Recorder(
            f"train-{run.id}", params=params, tags=tags,
            sample=_system_sampler(run),
            on_created=self._announce)
        context.started(self.recorder)
        run.add_listener(self._on_items)
        run.add_done_callback(self._on_done)

    def _announce(self, recorder: Recorder) -> None:
        """Tell the run lists (the sidebar) which MLflow run records this run."""
        self.run.client.log_event(events.RUNS_TOPIC, {
            "run": self.run.id, "state": "tracked",
            "mlflow": {"run_id": recorder.run_id, "experiment_id": recorder.experiment_id,
                       "uri": recorder.uri}})

    def _on_items(self, kind: str, items: list[dict[str, Any]]) -> None:
        if kind == "metrics":
            self.recorder.log_metrics(points_of(items))
        elif kind == "example" and self.example is None and items:
            self.example = items[0].get("example")
        elif kind == "checkpoint":
            now = int(time.time() * 1000)
            self.recorder.log_metrics([("checkpoint_step", float(i["step"]), int(i["step"]), now)
                                       for i in items])
        elif kind == "recovery":
            for record in items:
                # A recovery is complete once it reached its first step (a --resume record
                # has no phases of its own: it is in the params).
                if record.get("kind") == "recovery" and "first step" in record["phases"]:
                    now = int(time.time() * 1000)
                    self.recorder.log_metrics([
                        ("recovery_from_step", float(record["from_step"]), record["attempt"],
                         now),
                        ("recovery_seconds", record["phases"]["first step"]
                         - record["phases"]["detected"], record["attempt"], now)])
                    self.recorder.set_tags({"mlcloud.recoveries": record["attempt"]})

    def _log_model(self, run_id: str, model: Any, example: Any, reference: Any) -> None:
        self.model_uri = log_model(run_id, model, example, reference)

    def _on_done(self, run: Any) -> None:
        recorder = self.recorder
        run_events = json.loads(json.dumps(run.events, default=str))
        recorder.then("events", lambda run_id: store.client(recorder.uri).log_dict(
            run_id, {"events": run_events}, "mlcloud/events.json"))
        if run.status == "finished":
            model = find_model(run.result())
            if model is not None:
                example = example_array(self.example)
                reference = run.reference
                recorder.then("model", lambda run_id: self._log_model(run_id, model, example,
                                                                      reference))
        cost = getattr(run, "cost", None)
        if cost is not None:  # the final figures, the last point of each
            now = int(time.time() * 1000)
            recorder.log_metrics([(k, float(v), 0, now) for k, v in cost.as_dict().items()])
        if getattr(run, "stop_reason", None):
            recorder.set_tags({"mlcloud.stop_reason": run.stop_reason})
        recorder.end(END_STATUS.get(run.status, "FAILED"))


def track_training(run: Any, options: Mapping[str, Any], config: Mapping[str, Any] | None,
                   cluster: str | None = None, cluster_kind: str | None = None,
                   ) -> TrainingRecord:
    """Record ``run`` in MLflow (see :class:`TrainingRecord`); call before its ranks start."""
    return TrainingRecord(run, training_params(options, config), cluster=cluster,
                          cluster_kind=cluster_kind)


def record_scoring(params: Mapping[str, Any], summary: Mapping[str, Any] | None,
                   status: str) -> Recorder:
    """Record a finished (or failed) scoring job: its options, and its summary as metrics."""
    tags = {"mlcloud.kind": "score", **context.run_tags()}
    recorder = Recorder(f"score-{time.strftime('%Y%m%d-%H%M%S')}", params=params, tags=tags)
    context.started(recorder)
    now = int(time.time() * 1000)
    recorder.log_metrics([(k, float(v), 0, now) for k, v in (summary or {}).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)])
    recorder.end(status)
    return recorder
