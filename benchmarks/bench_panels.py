"""What a live loss panel costs a training run, and how fresh its points are.

    python benchmarks/bench_panels.py [--repeats 7] [--steps 2000]

A real Jupyter server (with this extension) and a warm 2-worker cluster; 2 CPU ranks train a
DDP MLP (64-256-1, gloo, one thread each) and call ``ctx.report(loss=...)`` on every step.

(a) slowdown: rank 0's steps/s with the loss panel closed vs open, where "open" means its data
    route (GET /mlcloud/runs/<id>/metrics) is polled once a second, as the panel page does.
    Runs alternate closed/open; medians over the repeats. Target: <= 2 % slower.
(b) latency: from ``ctx.report`` (the point's own time stamp) to the first answer of the data
    route that holds the point, polling every 20 ms while a run reports 50 points/s. Points
    reported before the route first answered are not counted. Target: median <= 1 s (the
    panel adds its own refresh period, up to 1 s, on top).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def train(ctx, steps: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
    """The benchmark's training loop; returns rank 0's steps/s after 10 warm-up steps."""
    import time

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ctx.prepare(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                            torch.nn.Linear(256, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 64), torch.randn(64, 1)
    start = None
    for step in range(steps):
        if step == 10:
            start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.report(loss=loss)
        if pause:
            time.sleep(pause)
    return (steps - 10) / (time.perf_counter() - start)


class Server:
    """``jupyter server`` in a subprocess, sharing this process's runtime dir (discovery)."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = secrets.token_hex(16)
        command = [sys.executable, "-m", "jupyter", "server", "--no-browser",
                   f"--port={self.port}", "--ServerApp.port_retries=0", "--ip=127.0.0.1",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}"]
        if os.getuid() == 0:
            command.append("--allow-root")
        self.log = open(root / "server.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/api/status")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the Jupyter server did not start") from None
                time.sleep(0.2)

    def get(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def poll(server: Server, run_id: str, every: float, stop: threading.Event,
         seen: dict[int, float] | None = None) -> None:
    """GET the run's data route every ``every`` seconds until ``stop``; note when each step
    was first served."""
    first_answer = None
    while not stop.is_set():
        started = time.monotonic()
        code, body = server.get(f"/mlcloud/runs/{run_id}/metrics")
        now = time.time()
        if code == 200 and seen is not None:
            columns = json.loads(body)
            if first_answer is None:
                first_answer = now
            for step, stamp in zip(columns["step"], columns["time"], strict=True):
                if step not in seen and stamp > first_answer:
                    seen[step] = now - stamp
        stop.wait(max(0.0, every - (time.monotonic() - started)))


def run_once(cluster, server: Server, steps: int, panel_open: bool) -> float:  # type: ignore[no-untyped-def]
    import jupyter_mlcloud as mlc

    run = mlc.train(lambda ctx: train(ctx, steps), cluster=cluster, workers=2)
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(server, run.id, 1.0, stop))
    if panel_open:
        poller.start()
    try:
        return float(run.result(timeout=600))
    finally:
        stop.set()
        if panel_open:
            poller.join()


def latency(cluster, server: Server, seconds: float) -> list[float]:  # type: ignore[no-untyped-def]
    import jupyter_mlcloud as mlc

    rate = 50
    run = mlc.train(lambda ctx: train(ctx, int(seconds * rate), pause=1 / rate),
                    cluster=cluster, workers=2)
    seen: dict[int, float] = {}
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(server, run.id, 0.02, stop, seen))
    poller.start()
    run.result(timeout=600)
    time.sleep(1.0)  # the last points' turn to be served
    stop.set()
    poller.join()
    return sorted(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "runtime").mkdir()
        os.environ["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")  # shared with the server

        import jupyter_mlcloud as mlc

        server = Server(root)
        try:
            with mlc.up(workers=2, gpu=False, name="bench-panels") as cluster:
                run_once(cluster, server, 50, panel_open=True)  # warm: torch imported
                closed, opened = [], []
                for _ in range(args.repeats):
                    closed.append(run_once(cluster, server, args.steps, panel_open=False))
                    opened.append(run_once(cluster, server, args.steps, panel_open=True))
                delays = latency(cluster, server, seconds=8)
        finally:
            server.close()

    a, b = statistics.median(closed), statistics.median(opened)
    slowdown = (a - b) / a * 100
    p95 = delays[int(0.95 * (len(delays) - 1))] if delays else float("nan")
    median = statistics.median(delays) if delays else float("nan")
    print(f"\n2 CPU ranks, gloo, ctx.report every step; {args.steps} steps, median of"
          f" {args.repeats} runs each (spread closed {min(closed):.0f}-{max(closed):.0f},"
          f" open {min(opened):.0f}-{max(opened):.0f} steps/s)")
    print(f"{'measure':<44}{'closed':>12}{'open':>12}{'change':>10}{'target':>10}")
    print(f"{'rank 0 steps/s (panel data polled each 1 s)':<44}{a:>12.1f}{b:>12.1f}"
          f"{slowdown:>9.2f}%{'<= 2 %':>10}")
    print(f"{'ctx.report -> served by the data route':<44}{'median':>12}{median:>11.3f}s"
          f"{'':>10}{'<= 1 s':>10}")
    print(f"{'':<44}{'p95':>12}{p95:>11.3f}s{'':>10}{'':>10}")
    print(f"({len(delays)} points timed)")


if __name__ == "__main__":
    main()
