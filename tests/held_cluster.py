"""A cluster held by another process (as a notebook kernel holds one), with finished runs on
it, whose scheduler a test can pause (SIGSTOP: it stops answering, as a hung or cut-off
scheduler does) and resume, or shut down.

Run as ``python -m tests.held_cluster NAME RUNS``: it starts the cluster, trains RUNS tiny runs
(loss, and compression bytes from the second step), prints one JSON line ``{"address",
"runs"}`` and holds the cluster until its standard input closes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent.parent


@dataclass
class HeldCluster:
    """The holding process, its cluster's name and address, and the ids of its runs."""

    process: subprocess.Popen[str]
    name: str
    address: str
    runs: list[str]

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Shut the cluster down (its discovery file goes with it) and wait for the process."""
        if self.process.poll() is not None:
            return
        self.resume()
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def start(name: str, runs: int = 1) -> HeldCluster:
    """Start the holding process and wait until its runs have finished."""
    from tests.conftest import read_line

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tests.held_cluster", name, str(runs)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT)
    assert process.stdout is not None
    line = read_line(process, timeout=300, what="cluster address")
    if not line:
        process.wait(10)
        raise RuntimeError(f"the cluster-holding process ended with {process.returncode}")
    found = json.loads(line)
    return HeldCluster(process, name, found["address"], found["runs"])


def _train(ctx) -> None:  # type: ignore[no-untyped-def]
    for step in range(6):
        values = {"loss": 1.0 / (step + 1)}
        if step:
            values.update(bytes_sent=1000.0 * step, bytes_ratio=0.25)
        ctx.report(**values)


def main() -> None:
    import jupyter_mlcloud as mlc

    name, count = sys.argv[1], int(sys.argv[2])
    with mlc.up(workers=1, name=name) as cluster:
        ids = []
        for _ in range(count):
            run = mlc.train(_train, cluster=cluster)
            run.result(timeout=120)
            ids.append(run.id)
        print(json.dumps({"address": cluster.address, "runs": ids}), flush=True)
        sys.stdin.read()  # until the test closes it


if __name__ == "__main__":
    main()
