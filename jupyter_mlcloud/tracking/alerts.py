"""An endpoint's record in MLflow: one run per endpoint (``serve-<name>``, tagged
``mlcloud.endpoint``), made when it first has something to record.

- Each alert adds the number of features that moved as the metric ``alerts/features``, its
  message as the tag ``mlcloud.last_alert``, and the whole alert as
  ``mlcloud/alerts/<time>.json``. :func:`log_alert` runs as a task on a worker (which has MLflow
  and reaches the store); the endpoint controller on the scheduler sends it there.
- When the endpoint closes, :func:`log_cost` adds what its replicas held: ``worker_seconds``,
  ``gpu_seconds`` and, with a price table, ``cost``, as any run records them.
"""

from __future__ import annotations

import time
from typing import Any

from ..lazy import LazyModule
from . import store

entities = LazyModule("mlflow.entities")  # loaded by the first write, not at import


def log_alert(uri: str, experiment: str, endpoint: str, alert: dict[str, Any]) -> str:
    """Record ``alert`` of ``endpoint`` in its MLflow run in ``experiment`` of the store at
    ``uri``; the run's id."""
    client = store.client(uri)
    run_id = _endpoint_run(client, experiment, endpoint)
    at = float(alert.get("time", time.time()))
    client.log_metric(run_id, "alerts/features", len(alert.get("features", ())),
                      timestamp=int(at * 1000), step=int(at))
    client.set_tag(run_id, "mlcloud.last_alert", str(alert.get("message", ""))[:4000])
    client.log_dict(run_id, alert, f"mlcloud/alerts/{at:.3f}.json")
    return run_id


def log_cost(uri: str, experiment: str, endpoint: str, figures: dict[str, Any]) -> str:
    """Record the final ``figures`` of ``endpoint`` (``Cost.as_dict()``: ``worker_seconds``,
    ``gpu_seconds``, ``cost`` or None) as metrics of its MLflow run; the run's id."""
    client = store.client(uri)
    run_id = _endpoint_run(client, experiment, endpoint)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        entities.Metric(name, float(value), now, 0) for name, value in figures.items()
        if name in ("worker_seconds", "gpu_seconds", "cost") and value is not None])
    return run_id


def _endpoint_run(client: Any, experiment: str, endpoint: str) -> str:
    """The id of ``endpoint``'s run in ``experiment``, made if it has none yet."""
    experiment_id = store.experiment_id(client, experiment)
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.`mlcloud.endpoint` = '{endpoint}'",
                               max_results=1)
    if found:
        return str(found[0].info.run_id)
    return str(client.create_run(
        experiment_id, run_name=f"serve-{endpoint}",
        tags={"mlcloud.kind": "serve", "mlcloud.endpoint": endpoint}).info.run_id)
