"""An endpoint's alerts in MLflow: one run per endpoint (``serve-<name>``, tagged
``mlcloud.endpoint``), made at its first alert; each alert adds the number of features that
moved as the metric ``alerts/features``, its message as the tag ``mlcloud.last_alert``, and
the whole alert as ``mlcloud/alerts/<time>.json``.

:func:`log_alert` runs as a task on a worker (which has MLflow and reaches the store); the
endpoint controller on the scheduler sends it there.
"""

from __future__ import annotations

import time
from typing import Any

from . import store


def log_alert(uri: str, experiment: str, endpoint: str, alert: dict[str, Any]) -> str:
    """Record ``alert`` of ``endpoint`` in its MLflow run in ``experiment`` of the store at
    ``uri``; the run's id."""
    client = store.client(uri)
    experiment_id = store.experiment_id(client, experiment)
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.`mlcloud.endpoint` = '{endpoint}'",
                               max_results=1)
    if found:
        run_id = str(found[0].info.run_id)
    else:
        run_id = str(client.create_run(
            experiment_id, run_name=f"serve-{endpoint}",
            tags={"mlcloud.kind": "serve", "mlcloud.endpoint": endpoint}).info.run_id)
    at = float(alert.get("time", time.time()))
    client.log_metric(run_id, "alerts/features", len(alert.get("features", ())),
                      timestamp=int(at * 1000), step=int(at))
    client.set_tag(run_id, "mlcloud.last_alert", str(alert.get("message", ""))[:4000])
    client.log_dict(run_id, alert, f"mlcloud/alerts/{at:.3f}.json")
    return run_id
