"""What this machine can measure of a 256-rank run: the inputs of ``docs/scale.md``.

    python benchmarks/bench_scale.py [--repeats 3] [--window 5] [--ranks 2,4,8,16,32,64]
                                     [--rendezvous 2,4,8,16,32,64] [--state-mib 64]

(a) Scheduler load from metrics. A ``dask scheduler`` process and two ``dask worker``
    processes (no nannies); ranks are simulated: each of the two workers runs K reporters, each
    the package's own ``EventBatcher`` (the object a rank's ``ctx.report`` feeds, flushing one
    Dask event every 0.2 s) fed 10 points/s, so ``--ranks 16`` is 8 reporters per worker;
    their flushes are spread over the interval, so that each event travels as its own
    message, as it would from ranks on separate hosts. The
    benchmark process subscribes to the topic, as the kernel's run does. The scheduler's CPU
    time (user + system, from /proc) over a ``--window`` of seconds, less the same window with
    no reporters, divided by the events logged, is the per-event cost; 256 ranks × 5 events/s
    × that cost is the extrapolation (from the two largest counts, where the scheduler's fixed
    costs weigh least; 32 and 64 check the trend past the 2–16 of the plan, still on two
    worker connections where 256 ranks would hold 256). Every event logged must reach the
    subscriber.
(b) Commit and checkpoint bandwidth per rank. On a 2-worker local cluster (``mlc.up``), plain
    TCP and TLS (``mlc.cluster_certificates``): a commit's in-memory copy on the rank (a state
    of ``--state-mib`` MiB cloned) and its copy to the peer worker (Dask moving it worker to
    worker); and a checkpoint (``torch.save`` of the state, written through fsspec to local
    disk and fsynced) from one rank alone and from both at once. No object store runs here:
    the disk stands in for it, and the plan states object-store figures as assumptions.
(c) Rendezvous as ranks grow: N ranks as threads of this process, each connecting its own
    ``TCPStore`` client to one master and building its own gloo process group on loopback
    (the full mesh: N-1 connections per rank), then one all-reduce. Two columns: the store
    connect, and ready (the group built and the all-reduce done), both the slowest rank's;
    then both again in a process whose resolver gives up after 1 s (``RES_OPTIONS``): c10d
    looks a name up as a rank connects, and a machine without a reachable name server (this
    one) waits glibc's 5 s for it, now and then.

Medians of ``--repeats`` runs with min–max. Only the benchmark should run on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from stats import quantile

THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in THREAD_VARS.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d warns once per staggered rank

REPORTS_PER_S = 10  # per rank, as the brief of the plan says
FLUSH_S = 0.2  # EventBatcher's interval: at most 5 events per rank per second
TOPIC = "mlcloud-metrics-bench-scale"


def summary(values: list[float], fmt: str) -> str:
    """``median (min–max)``; a single value alone."""
    if len(values) == 1:
        return format(values[0], fmt)
    return (f"{format(statistics.median(values), fmt)}"
            f" ({format(min(values), fmt)}–{format(max(values), fmt)})")


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))


# ---------------------------------------------------------------- (a) metrics events


def reporters(k: int, window: float, topic: str, rate: float, phase: float) -> dict[str, int]:
    """On a worker: ``k`` simulated ranks reporting ``rate`` points/s each for ``window`` s,
    each through its own EventBatcher; the events and points sent.

    The batchers start spread over one flush interval (``phase`` of a step later on the
    second worker), as ranks on their own hosts flush out of step: started together, their
    events would leave in one message and hide the scheduler's cost per message."""
    from distributed import get_worker

    from jupyter_mlcloud.telemetry.events import EventBatcher, point

    worker = get_worker()
    lock = threading.Lock()
    sent = {"events": 0, "points": 0}

    def log_event(topic: str, msg: Any) -> None:
        with lock:
            sent["events"] += 1
            sent["points"] += len(msg["items"])
        worker.log_event(topic, msg)

    step_s = FLUSH_S / k
    time.sleep(phase * step_s)
    batchers = []
    for _ in range(k):
        batchers.append(EventBatcher(log_event, topic, FLUSH_S))
        time.sleep(step_s)
    # One feeder thread for all k: a rank's reports cost the scheduler nothing until flushed.
    start = time.monotonic()
    tick, step = start, 0
    while time.monotonic() < start + window:
        step += 1
        for rank, batcher in enumerate(batchers):
            batcher.add(point(rank, step, 0, {"loss": 1.0 / step, "lr": 0.01}))
        tick += 1.0 / rate
        time.sleep(max(0.0, tick - time.monotonic()))
    for batcher in batchers:
        batcher.close()
    return sent


def dask_cli() -> list[str]:
    exe = Path(sys.executable).parent / "dask"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def measure_events(ranks: list[int], repeats: int, window: float) -> list[dict[str, Any]]:
    from distributed import Client

    with tempfile.TemporaryDirectory() as tmp:
        scheduler_file = os.path.join(tmp, "scheduler.json")
        env = {**os.environ, **THREAD_VARS}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        scheduler = subprocess.Popen([*dask_cli(), "scheduler", "--host", "127.0.0.1",
                                      "--port", "0", "--no-dashboard", "--scheduler-file",
                                      scheduler_file], **quiet)  # type: ignore[call-overload]
        workers: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(scheduler_file):
                if time.monotonic() > deadline or scheduler.poll() is not None:
                    raise RuntimeError("the scheduler did not start")
                time.sleep(0.1)
            workers = [subprocess.Popen([*dask_cli(), "worker", "--scheduler-file",
                                         scheduler_file, "--nthreads", "1", "--no-nanny",
                                         "--no-dashboard", "--host", "127.0.0.1"], **quiet)
                       for _ in range(2)]
            with Client(scheduler_file=scheduler_file, timeout=60) as client:
                client.wait_for_workers(2, timeout=120)
                addresses = sorted(client.scheduler_info()["workers"])
                # The workers import the package's telemetry once, before any timing.
                client.run(lambda: __import__("jupyter_mlcloud.telemetry.events"))
                received = {"n": 0}
                client.subscribe_topic(TOPIC, lambda event: received.update(n=received["n"] + 1))
                results = []
                for n in [0, *ranks]:
                    for _ in range(repeats):
                        results.append(one_window(client, scheduler.pid, addresses, n,
                                                  window, received))
            return results
        finally:
            for process in [*workers, scheduler]:
                process.terminate()
            for process in [*workers, scheduler]:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()


def one_window(client: Any, pid: int, addresses: list[str], n: int, window: float,
               received: dict[str, int]) -> dict[str, Any]:
    before_events = received["n"]
    before = cpu_seconds(pid)
    if n:
        futures = [client.submit(reporters, n // 2, window, TOPIC, REPORTS_PER_S, i / 2,
                                 workers=[a], pure=False, allow_other_workers=False)
                   for i, a in enumerate(addresses)]
        sent = [f.result(timeout=window + 60) for f in futures]
    else:
        time.sleep(window)  # the idle baseline: the scheduler's ticks and heartbeats
        sent = []
    cpu = cpu_seconds(pid) - before
    events = sum(s["events"] for s in sent)
    points = sum(s["points"] for s in sent)
    deadline = time.monotonic() + 10
    while received["n"] - before_events < events and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"ranks": n, "cpu": cpu, "events": events, "points": points,
            "delivered": received["n"] - before_events, "window": window}


# ---------------------------------------------------------------- (b) commits and checkpoints


def commit_copy(state_mib: int) -> dict[str, float]:
    """On a worker: seconds to clone a ``state_mib`` MiB state in memory (a commit's copy)."""
    import torch

    torch.set_num_threads(1)
    state = torch.ones(state_mib * 2**20 // 4)
    state.clone()  # first touch of the allocator's pages, outside the timing
    start = time.perf_counter()
    state.clone()
    return {"clone_s": time.perf_counter() - start}


def make_state(state_mib: int) -> Any:
    import torch

    return torch.ones(state_mib * 2**20 // 4)


def write_checkpoint(state_mib: int, path: str) -> float:
    """On a worker: seconds for ``torch.save`` of the state into a file through fsspec,
    flushed to the disk (serializing included, as a rank's checkpoint write is)."""
    import io

    import fsspec
    import torch

    torch.set_num_threads(1)
    state = {"model": torch.ones(state_mib * 2**20 // 4)}
    start = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fsspec.open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def measure_bandwidth(state_mib: int, repeats: int) -> dict[str, list[float]]:
    from distributed import wait

    import jupyter_mlcloud as mlc

    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")  # no stray discovery
        certs = mlc.cluster_certificates(os.path.join(tmp, "certs"))
        for label, tls in (("tcp", False), ("tls", True)):
            with mlc.up(workers=2, gpu=False, name=f"bench-scale-{label}",
                        tls=certs if tls else False) as cluster:
                client = cluster.client
                a, b = sorted(client.scheduler_info()["workers"])
                client.submit(commit_copy, 1, workers=[a], pure=False).result()  # torch warm
                client.submit(commit_copy, 1, workers=[b], pure=False).result()
                for _ in range(repeats):
                    if tls:
                        clone = client.submit(commit_copy, state_mib, workers=[a], pure=False)
                        out.setdefault("clone", []).append(
                            state_mib / clone.result()["clone_s"])
                    state = client.submit(make_state, state_mib, workers=[a], pure=False)
                    wait(state, timeout=120)  # made on a before the clock starts
                    start = time.perf_counter()
                    moved = client.submit(lambda s: s.numel(), state, workers=[b], pure=False,
                                          allow_other_workers=False)
                    moved.result(timeout=120)
                    out.setdefault(f"peer-{label}", []).append(
                        state_mib / (time.perf_counter() - start))
                    del state, moved
                if not tls:
                    for _ in range(repeats):
                        alone = client.submit(write_checkpoint, state_mib,
                                              os.path.join(tmp, "alone.pt"), workers=[a],
                                              pure=False).result(timeout=300)
                        out.setdefault("checkpoint-1", []).append(state_mib / alone)
                        both = client.gather([
                            client.submit(write_checkpoint, state_mib,
                                          os.path.join(tmp, f"rank-{i}.pt"), workers=[w],
                                          pure=False) for i, w in enumerate((a, b))])
                        out.setdefault("checkpoint-2", []).append(state_mib / max(both))
    return out


# ---------------------------------------------------------------- (c) rendezvous


# A resolver that gives up after 1 s instead of glibc's 5 s: c10d looks a name up while a rank
# connects, and where no name server answers (this machine) that lookup is what waits.
QUICK_RESOLVER = {"RES_OPTIONS": "timeout:1 attempts:1"}


def rendezvous(n: int) -> tuple[float, float]:
    """``n`` ranks as threads: (the slowest store connect, the slowest rank ready), seconds
    from the common start."""
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=120)
    master = dist.TCPStore("127.0.0.1", 0, n, True, timeout=timeout, wait_for_workers=False)
    connected = [0.0] * n
    ready = [0.0] * n
    errors: list[BaseException] = []
    go = threading.Event()

    def rank(r: int) -> None:
        try:
            go.wait()
            start = time.perf_counter()
            store = master if r == 0 else dist.TCPStore("127.0.0.1", master.port, n, False,
                                                        timeout=timeout)
            connected[r] = time.perf_counter() - start
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(interface="lo")]
            group = dist.ProcessGroupGloo(store, r, n, options)
            total = torch.ones(1)
            group.allreduce([total]).wait()
            if total.item() != n:
                raise RuntimeError(f"all-reduce of {n} ranks gave {total.item()}")
            ready[r] = time.perf_counter() - start
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(connected), max(ready)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per events window")
    parser.add_argument("--ranks", default="2,4,8,16,32,64",
                        help="simulated ranks (even numbers); the last two give the cost")
    parser.add_argument("--rendezvous", default="2,4,8,16,32,64")
    parser.add_argument("--state-mib", type=int, default=64)
    parser.add_argument("--target-ranks", type=int, default=256)
    parser.add_argument("--parts", default="a,b,c", help="which of (a), (b), (c) to run")
    parser.add_argument("--rendezvous-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if any(r < 2 or r % 2 for r in ranks):
        raise SystemExit(f"--ranks takes even numbers >= 2 (two workers), got {args.ranks!r}.")
    parts = set(args.parts.split(","))
    if args.rendezvous_child:
        counts = [int(r) for r in args.rendezvous.split(",")]
        print(json.dumps({n: [rendezvous(n) for _ in range(args.repeats)] for n in counts}))
        return
    load_before = os.getloadavg()
    began = time.monotonic()
    if "a" in parts:
        measure_and_print_events(ranks, args)
    if "b" in parts:
        measure_and_print_bandwidth(args)
    if "c" in parts:
        measure_and_print_rendezvous(args)
    print(f"\n{os.cpu_count()} cores; load average before"
          f" {' '.join(f'{v:.2f}' for v in load_before)}, after"
          f" {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {time.monotonic() - began:.0f} s")


def rendezvous_child(counts: list[int], repeats: int, env: dict[str, str]) -> dict[str, Any]:
    """(c) in a fresh process, whose resolver reads ``env`` when it first starts."""
    done = subprocess.run(
        [sys.executable, __file__, "--rendezvous-child", "--repeats", str(repeats),
         "--rendezvous", ",".join(map(str, counts))],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=1800, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_and_print_events(ranks: list[int], args: argparse.Namespace) -> None:
    results = measure_events(ranks, args.repeats, args.window)
    idle = [r["cpu"] / r["window"] for r in results if r["ranks"] == 0]
    idle_rate = statistics.median(idle)
    rows = []
    for n in ranks:
        runs = [r for r in results if r["ranks"] == n]
        per_event = [(r["cpu"] - idle_rate * r["window"]) / r["events"] * 1e6 for r in runs]
        lost = sum(r["events"] - r["delivered"] for r in runs)
        if lost:
            raise SystemExit(f"{lost} events of {n} ranks never reached the subscriber")
        rows.append([str(n), summary([r["events"] / r["window"] for r in runs], ".0f"),
                     summary([r["points"] / r["window"] for r in runs], ".0f"),
                     summary([100 * r["cpu"] / r["window"] for r in runs], ".1f"),
                     summary(per_event, ".0f")])
    table(f"(a) scheduler load from ctx.report: {REPORTS_PER_S} reports/s per rank,"
          f" {FLUSH_S:g} s flushes, {args.window:g} s windows, medians of {args.repeats}"
          f" (min–max); idle scheduler {100 * idle_rate:.1f} % of a core",
          ["ranks", "events/s", "points/s", "scheduler CPU %", "µs per event (less idle)"],
          rows)
    # The cost per event at 16 ranks (the largest count of the plan's 2-16, cautious: fixed
    # costs still weigh), and at the two largest counts measured (the trend further on).
    def cost(counts: list[int]) -> list[float]:
        return [(r["cpu"] - idle_rate * r["window"]) / r["events"] * 1e6
                for r in results if r["ranks"] in counts]

    for counts in ([16] if 16 in ranks else [], ranks[-2:]):
        if not counts:
            continue
        per_event_us = statistics.median(cost(counts))
        for target in (args.target_ranks, 4 * args.target_ranks):
            events_s = target / FLUSH_S
            print(f"extrapolated from {counts} ranks to {target}: {events_s:.0f} events/s ×"
                  f" {per_event_us:.0f} µs = {events_s * per_event_us / 1e4:.0f} % of a"
                  f" scheduler core (+ idle {100 * idle_rate:.1f} %); per-event p25–p75"
                  f" {quantile(cost(counts), 0.25):.0f}–{quantile(cost(counts), 0.75):.0f} µs")


def measure_and_print_bandwidth(args: argparse.Namespace) -> None:
    bandwidth = measure_bandwidth(args.state_mib, args.repeats)
    labels = {"clone": "commit: in-memory copy on the rank (clone)",
              "peer-tcp": "commit: copy to the peer worker, tcp://",
              "peer-tls": "commit: copy to the peer worker, tls://",
              "checkpoint-1": "checkpoint: torch.save + fsspec write + fsync, 1 rank",
              "checkpoint-2": "checkpoint: the same, 2 ranks at once (per rank)"}
    table(f"(b) bandwidth per rank, a {args.state_mib} MiB state, medians of {args.repeats}"
          " (min–max)", ["what", "MiB/s"],
          [[text, summary(bandwidth[k], ".0f")] for k, text in labels.items()])


def measure_and_print_rendezvous(args: argparse.Namespace) -> None:
    counts = [int(r) for r in args.rendezvous.split(",")]
    plain = rendezvous_child(counts, args.repeats, {})
    quick = rendezvous_child(counts, args.repeats, QUICK_RESOLVER)
    rows = [[str(n), *(summary([x[i] for x in runs[str(n)]], ".3f")
                       for runs in (plain, quick) for i in (0, 1))] for n in counts]
    table(f"(c) rendezvous: ranks as threads of one process on loopback (gloo), medians of"
          f" {args.repeats} (min–max), seconds, the slowest rank; then the same with the"
          f" resolver's timeout at 1 s ({QUICK_RESOLVER['RES_OPTIONS']})",
          ["ranks", "TCPStore connect", "group ready + 1 all-reduce", "connect, 1 s resolver",
           "ready, 1 s resolver"], rows)


if __name__ == "__main__":
    main()
