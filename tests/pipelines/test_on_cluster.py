"""A step that computes on the cluster it is given; a cached rerun submits nothing to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed import get_task_stream

from jupyter_mlcloud.pipelines import pipeline

CLUSTER = {"name": "pipelines", "workers": 1}


def test_a_cached_rerun_costs_the_cluster_nothing(cluster: Any, tmp_path: Path,
                                                  name: str) -> None:
    pipe = pipeline(name, root=tmp_path)

    @pipe.step(params={"n": 100}, outputs=["total"])
    def total(n: int, cluster: Any) -> int:
        return int(cluster.client.submit(sum, range(n), pure=False).result())

    with get_task_stream(cluster.client) as first:
        assert pipe.run(cluster=cluster).outputs == {"total": 4950}
    assert len(first.data) == 1
    with get_task_stream(cluster.client) as second:
        result = pipe.run(cluster=cluster)
    assert result["total"].state == "cached" and result.outputs == {"total": 4950}
    assert second.data == []
