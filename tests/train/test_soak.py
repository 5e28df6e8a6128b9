"""A soak: many runs on one long-lived cluster, each losing a worker at a random step, while
another process holds one of the two cores. Every run must end bit-identical to the
uninterrupted one, and the cluster must be whole again after each."""

from __future__ import annotations

import random

import jupyter_mlcloud as mlc
from tests.conftest import ModuleCluster, busy_core, digest, make_fit, wait_for_workers

CLUSTER = {"name": "soak", "workers": 2}
RUNS = 10
STEPS = 24  # make_fit: 3 epochs of 8 steps per rank


def test_ten_kills_in_a_row_on_a_busy_machine(module_cluster: ModuleCluster) -> None:
    cluster = module_cluster.whole()
    expected = digest(mlc.train(make_fit(), cluster=cluster).result(timeout=300))
    draw = random.Random(13)
    kills = [(draw.randrange(2), draw.randrange(2, STEPS)) for _ in range(RUNS)]
    with busy_core():
        for i, (rank, step) in enumerate(kills):
            run = mlc.train(make_fit(kills=((0, rank, step),)), cluster=cluster,
                            max_failures=1)
            model = run.result(timeout=300)
            assert digest(model) == expected, f"run {i} (rank {rank} killed at step {step})"
            assert [e["lost_ranks"] for e in run.events] == [[rank]]
            wait_for_workers(cluster, 2)
    assert module_cluster.replaced == 0  # the cluster itself held: never started anew
