"""Real-time endpoints (``mlc.serve``) under load on 2 CPU workers, over loopback TLS.

    python benchmarks/bench_serve.py [--only a,b,...] [--quick] [--repeats N]

Every request is the same Open Inference Protocol v2 JSON body (one row; FP32), sent with a
bearer token over HTTPS with keep-alive, by one load generator for every system compared: a
separate process (asyncio, raw keep-alive TLS connections, no HTTP library), so the client's
cost is the same for all and it never shares an event loop with the cluster's scheduler. It
runs either closed loop (N connections, each sending its next request when the last one is
answered: "concurrency N") or open loop (requests scheduled at a fixed rate over at most C
connections, latency counted from the scheduled time, so a stall is not hidden). Every run is
bounded in requests and seconds. Comparisons take turns within each repeat (A, B, A, B, ...),
so load from other work falls on all alike; figures are medians of the repeats, with their
range (min-max) as the spread.

Items (each prints a markdown table with the figure, its target and whether it is met):

a. router overhead: p50/p99 latency at concurrency 1 through the endpoint URL minus calling
   its replicas directly (same token, same CA), no-op model. Target <= 0.5 ms p50, <= 2 ms p99.
b. no-op model throughput through the URL at concurrency 8 and 64 vs Ray Serve (1 and 2
   replicas, its HTTP proxy with the same kind of certificate) and vs a bare uvicorn+Starlette
   app (one process, same TLS, same parse/model/encode work, token checked, no batching).
   Targets: >= 10x Ray Serve, >= 0.25x the bare app. Ray needs the ``bench`` extra.
c. MLP 64-256-256-10 at saturation (closed loop, concurrency 64): max_batch_size=32 vs 1.
   Target: throughput >= 3x, p95 <= 2x.
d. p99 at concurrency 64 vs at concurrency 1 (the MLP, max_batch_size=32). Target <= 5x.
e. SIGKILL of a replica's worker process (not the router's) under steady open-loop load:
   failed requests (target 0) and the time until the endpoint serves from as many replicas
   as before (a new one routed and answering; target <= 15 s).
f. canary at 10 %: the share of 10,000 requests answered by the new version (header
   x-mlcloud-model-version), target within 1.5 points of 10 %; then rollback under load:
   the last answer from the new version after rollback() is called (target <= 1 s) and
   errors (target 0).
g. router and replica RSS over 200,000 requests (``--quick``: 20,000) at concurrency 8 on the
   no-op model: growth from the end of the first tenth (warm: caches and the router's recent
   latency window full) to the end. Target <= 5 %.
h. autoscale "1:4" (up_delay_s=1, down_delay_s=3): a step from concurrency 4 to 16 -> the
   first new replica answering (target <= 10 s); back to 4 -> the first scale-down and the
   return to 1 replica; errors over the whole run (target 0).
i. ``mlc.serve(...)`` call -> first 200 answer, on warm workers (target <= 3 s);
   ``ep.update(model, canary=0.1)`` under load -> the first answer by the new version
   (target <= 2 s), and its share of the answers from then on.
j. monitoring on vs off: the MLP's throughput at concurrency 8 and 64 with a reference (every
   request's rows and outputs kept in the replica's window, drift checked every second) vs
   the same endpoint without one. Target >= 0.95.

``--quick`` runs fewer and shorter repeats (3 of 2 s; 20,000 requests for g; one kill for e)
and takes about 7 minutes on 2 cores; a full run (4 repeats of 2.5 s, 200,000 requests for g,
two kills) about 15, most of it g. ``--only`` runs some items (in the order a b c d f i j g e h:
e restarts a worker, and h may make the cluster grow, since an autoscaled endpoint keeps one
replica a worker and asks for more). Timings are of this machine, with whatever else runs on
it: read the ratios, and the spreads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stats import quantile

THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in THREAD_VARS.items():
    os.environ.setdefault(_name, _value)

NOOP_FEATURES = 16
MLP_FEATURES = 64
VERSION_HEADER = b"x-mlcloud-model-version"
ITEMS = "abcdefghij"
RUN_ORDER = "abcdfijgeh"  # e restarts a worker; h may add workers (one replica a worker)
REQUEST_TIMEOUT_S = 30.0


def body_of(features: int) -> str:
    """One row of ``features`` FP32 values as an Open Inference Protocol v2 JSON body."""
    data = [round(0.01 * i, 2) for i in range(features)]
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                   "shape": [1, features], "data": data}]})


# ================================================================ the load generator process


class _Conn:
    """One keep-alive TLS connection to one target."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0.0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.context, server_hostname=self.host)
        self.used = time.monotonic()

    def drop(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, str]:
        """Send ``request``; the answer's status and model version header."""
        # Servers close keep-alive connections idle for 5 s: never send on one idle for 3 s.
        if self.writer is None or time.monotonic() - self.used > 3.0:
            self.drop()
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, version, close = 0, False, "", False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif key == VERSION_HEADER:
                version = value.strip().decode()
            elif key == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                await self.reader.readexactly(size + 2)
        elif length:
            await self.reader.readexactly(length)
        self.used = time.monotonic()
        if close:
            self.drop()
        return status, version


async def _within(exchange: Any) -> tuple[int, str]:
    if hasattr(asyncio, "timeout"):  # Python >= 3.11: no task per request
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await exchange  # type: ignore[no-any-return]
    return await asyncio.wait_for(exchange, REQUEST_TIMEOUT_S)  # type: ignore[no-any-return]


def _request_bytes(url: str, token: str, body: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    payload = body.encode()
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    return str(parts.hostname), int(parts.port or 443), head.encode() + payload


class _Generator:
    """One load run as the spec says (see :class:`Load`); its figures as a dict."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        context = ssl.create_default_context(cafile=spec["ca"])
        self.targets = [_request_bytes(u, spec["token"], spec["body"]) for u in spec["targets"]]
        self.context = context
        self.sent = 0
        self.done = 0
        self.records: list[tuple[float, float, int, str]] = []
        self.errors: dict[str, int] = {}
        self.t_begin = self.t0 = 0.0

    async def _one(self, conns: list[_Conn], k: int, started: float) -> None:
        index = k % len(self.targets)
        conn = conns[index]
        try:
            status, version = await _within(conn.exchange(self.targets[index][2]))
        except Exception as e:  # a broken connection, a reset, a timeout: a failed request
            conn.drop()
            status, version = 0, type(e).__name__
        end = time.monotonic()
        self.records.append((started, end, status, version))
        if status != 200:
            kind = f"HTTP {status}" if status else version
            self.errors[kind] = self.errors.get(kind, 0) + 1
        self.done += 1
        every = self.spec.get("progress") or 0
        if every and self.done % every == 0:
            print(json.dumps({"progress": self.done, "t": end}), flush=True)

    async def _connections(self, n: int) -> list[list[_Conn]]:
        pools = [[_Conn(h, p, self.context) for h, p, _ in self.targets] for _ in range(n)]
        await asyncio.gather(*(c.open() for pool in pools for c in pool))
        return pools

    def _announce(self) -> None:
        self.t_begin = time.monotonic()
        self.t0 = self.t_begin + float(self.spec.get("warmup", 0.0))
        print(json.dumps({"started": self.t_begin, "t0": self.t0}), flush=True)

    async def closed(self) -> None:
        phases = [(float(s), int(c)) for s, c in self.spec["phases"]]
        warmup = float(self.spec.get("warmup", 0.0))
        limit = self.spec.get("requests")
        pools = await self._connections(max(c for _, c in phases))
        self._announce()
        bounds = []
        at = self.t0
        for seconds, concurrency in phases:
            at += seconds
            bounds.append((at, concurrency))
        hard_stop = self.t_begin + float(self.spec.get("max_s", 600.0))

        def concurrency_now(now: float) -> int | None:
            if now < self.t0:
                return phases[0][1] if warmup else None
            for end, concurrency in bounds:
                if now < end:
                    return concurrency
            return None

        async def loop(i: int) -> None:
            while True:
                now = time.monotonic()
                active = concurrency_now(now)
                if active is None or now > hard_stop or (limit and self.sent >= limit):
                    return
                if i >= active:
                    await asyncio.sleep(0.005)
                    continue
                k = self.sent
                self.sent += 1
                await self._one(pools[i], k, now)

        await asyncio.gather(*(loop(i) for i in range(len(pools))))

    async def open_loop(self) -> None:
        rate, n = float(self.spec["rate"]), int(self.spec["requests"])
        pools = await self._connections(int(self.spec["connections"]))
        queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
        self._announce()

        async def loop(i: int) -> None:
            while (item := await queue.get()) is not None:
                await self._one(pools[i], item[1], item[0])

        tasks = [asyncio.ensure_future(loop(i)) for i in range(len(pools))]
        k = 0
        while k < n:
            now = time.monotonic()
            due = self.t0 + k / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while k < n and self.t0 + k / rate <= now:
                queue.put_nowait((self.t0 + k / rate, k))
                k += 1
        for _ in tasks:
            queue.put_nowait(None)
        await asyncio.gather(*tasks)

    def result(self) -> dict[str, Any]:
        spec = self.spec
        if spec["mode"] == "closed" and not spec.get("requests"):
            end = self.t0 + sum(float(s) for s, _ in spec["phases"])
        else:
            end = max((r[1] for r in self.records), default=self.t0)
        window = [r for r in self.records if r[2] == 200 and self.t0 <= r[1] <= end]
        out: dict[str, Any] = {
            "t0": self.t0, "end": end, "ok": len(window),
            "rate": len(window) / max(end - self.t0, 1e-9),
            "lat": [r[1] - r[0] for r in window], "errors": self.errors,
            "requests": len(self.records)}
        if spec.get("records"):
            out["records"] = [[round(a, 6), round(b, 6), s, v] for a, b, s, v in self.records]
        return out


def loadgen_main() -> None:
    spec = json.loads(sys.stdin.readline())
    generator = _Generator(spec)
    run = generator.closed if spec["mode"] == "closed" else generator.open_loop
    asyncio.run(run())
    print(json.dumps({"result": generator.result()}), flush=True)


class Load:
    """A load generator process running one spec: ``targets`` (infer URLs, taken in turn),
    ``mode`` "closed" (``phases`` [[seconds, concurrency], ...] after ``warmup`` s, or
    ``requests`` in all) or "open" (``requests`` at ``rate``/s over ``connections``);
    ``records`` keeps (sent, answered, status, version) per request, ``progress`` prints
    every that many answers."""

    def __init__(self, target: Target, **spec: Any) -> None:
        spec = {"targets": target.urls, "token": target.token, "ca": target.ca,
                "body": target.body, **spec}
        env = {**os.environ, **THREAD_VARS}
        self.process = subprocess.Popen([sys.executable, __file__, "--loadgen"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self.progress: list[dict[str, float]] = []
        started = self._line()
        self.started, self.t0 = started["started"], started["t0"]
        self._result: dict[str, Any] | None = None

    def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(30)
            raise RuntimeError(f"the load generator exited ({self.process.returncode})")
        return dict(json.loads(line))

    def next_progress(self) -> dict[str, float] | None:
        """The next progress line, or None once the result came."""
        if self._result is not None:
            return None
        doc = self._line()
        if "result" in doc:
            self._result = doc["result"]
            return None
        self.progress.append(doc)
        return doc

    def result(self) -> dict[str, Any]:
        while self.next_progress() is not None:
            pass
        assert self._result is not None
        self.process.wait(30)
        return self._result


@dataclass
class Target:
    """Where a load goes: infer URLs, the token, the PEM verifying them, the body."""

    urls: list[str]
    token: str
    ca: str
    body: str


def closed(target: Target, seconds: float, concurrency: int, warmup: float = 0.5
           ) -> dict[str, Any]:
    """A closed-loop run at ``concurrency`` for ``seconds`` after ``warmup``."""
    return Load(target, mode="closed", warmup=warmup, phases=[[seconds, concurrency]]).result()


# ================================================================ models and peers


def make_noop() -> Any:
    import torch

    return torch.nn.Identity()


def make_mlp(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(MLP_FEATURES, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10)).eval()


def noop_answer(model: Any, body: bytes) -> bytes:
    """What the peers do per request: parse the v2 JSON, run the model, encode the answer."""
    import numpy as np
    import torch

    doc = json.loads(body)
    given = doc["inputs"][0]
    rows = np.asarray(given["data"], dtype=np.float32).reshape(given["shape"])
    with torch.inference_mode():
        out = model(torch.from_numpy(rows)).numpy()
    return json.dumps({"model_name": "noop", "model_version": "1", "outputs": [
        {"name": "output", "datatype": "FP32", "shape": list(out.shape),
         "data": out.reshape(-1).tolist()}]}).encode()


def bare_main(certfile: str, keyfile: str) -> None:
    """The bare peer: one uvicorn process, a Starlette route, the same TLS and uvicorn
    settings as a replica; prints its port."""
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    token = os.environ["BENCH_SERVE_TOKEN"]
    model = make_noop()

    async def infer(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {token}":
            return Response(status_code=401)
        return Response(noop_answer(model, await request.body()),
                        media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # as uvicorn's
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(app, ssl_certfile=certfile, ssl_keyfile=keyfile,
                            log_level="warning", access_log=False, lifespan="on",
                            loop="auto", http="auto", server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def bare_app(tls: Any, token: str) -> Iterator[str]:
    """The bare peer running; its infer URL."""
    env = {**os.environ, **THREAD_VARS, "BENCH_SERVE_TOKEN": token}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    process = subprocess.Popen([sys.executable, __file__, "--bare", tls.certfile, tls.keyfile],
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"https://127.0.0.1:{port}/v2/models/noop/infer"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def ray_serve(tls: Any) -> Iterator[dict[str, str]]:
    """Ray Serve with the no-op model as apps of 1 and 2 replicas behind its HTTPS proxy;
    their infer URLs by label. Raises if Ray cannot run here."""
    import logging
    import socket

    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port,
                                  "ssl_certfile": tls.certfile, "ssl_keyfile": tls.keyfile})

        @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
        class NoOp:
            def __init__(self) -> None:
                self.model = make_noop()

            async def __call__(self, request: Any) -> Any:
                from starlette.responses import Response

                return Response(noop_answer(self.model, await request.body()),
                                media_type="application/json")

        urls = {}
        for n in (1, 2):
            serve.run(NoOp.options(num_replicas=n).bind(), name=f"r{n}", route_prefix=f"/r{n}")
            urls[f"Ray Serve, {n} replica{'s' if n > 1 else ''}"] = (
                f"https://127.0.0.1:{port}/r{n}/v2/models/noop/infer")
        yield urls
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ================================================================ the report


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def spread(values: list[float], spec: str = ".2f") -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(min(values), spec)}-{format(max(values), spec)}"


def meets(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


def table(title: str, note: str, header: list[str], rows: list[list[str]]) -> None:
    lines = [f"### {title}", "", note, "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n" + "\n".join(lines) + "\n", flush=True)


def ms(values: list[float], q: float) -> float:
    return 1000.0 * quantile(values, q)


# ================================================================ the items


@dataclass
class Context:
    cluster: Any
    quick: bool
    repeats: int
    seconds: float  # of one throughput run
    endpoints: dict[str, Any] = field(default_factory=dict)

    @property
    def client(self) -> Any:
        return self.cluster.client

    def endpoint(self, name: str) -> Any:
        """The shared endpoints, started on first use: bench-noop (2 replicas),
        bench-mlp (2 replicas, batching), bench-mlp-b1 (2 replicas, max_batch_size=1)."""
        import jupyter_mlcloud as mlc

        if name not in self.endpoints:
            model, batch = {"bench-noop": (make_noop(), 32), "bench-mlp": (make_mlp(), 32),
                            "bench-mlp-b1": (make_mlp(), 1)}[name]
            self.endpoints[name] = mlc.serve(model, name=name, cluster=self.cluster,
                                             replicas=2, max_batch_size=batch, max_wait_ms=5)
        return self.endpoints[name]

    def target(self, ep: Any, direct: bool = False) -> Target:
        features = NOOP_FEATURES if ep.name == "bench-noop" else MLP_FEATURES
        urls = ([f"{r['url']}/v2/models/{ep.name}/infer" for r in ep.replica_info] if direct
                else [ep.infer_url()])
        return Target(urls, ep.token, ep.ca_file, body_of(features))

    def note(self, extra: str) -> str:
        load = os.getloadavg()
        return (f"2 CPU workers (1 thread each), loopback HTTPS, keep-alive; {extra}"
                f" (1-min load average now {load[0]:.2f}).")


def item_a(ctx: Context) -> None:
    ep = ctx.endpoint("bench-noop")
    url, direct = ctx.target(ep), ctx.target(ep, direct=True)
    got: dict[str, list[tuple[float, float]]] = {"url": [], "direct": []}
    for _ in range(ctx.repeats):
        for label, target in (("url", url), ("direct", direct)):
            lat = closed(target, ctx.seconds + 1, 1)["lat"]
            got[label].append((ms(lat, 0.5), ms(lat, 0.99)))
    rows = []
    for i, (name, limit) in enumerate((("p50", 0.5), ("p99", 2.0))):
        through = [u[i] for u in got["url"]]
        alone = [d[i] for d in got["direct"]]
        extra = [u - d for u, d in zip(through, alone, strict=True)]
        rows.append([f"{name} through the URL (ms)", fmt(statistics.median(through), ".3f"),
                     spread(through, ".3f"), "", ""])
        rows.append([f"{name} calling the replicas directly (ms)",
                     fmt(statistics.median(alone), ".3f"), spread(alone, ".3f"), "", ""])
        rows.append([f"**router overhead, {name} (ms)**", fmt(statistics.median(extra), ".3f"),
                     spread(extra, ".3f"), f"<= {limit}",
                     meets(statistics.median(extra) <= limit)])
    table("a. Router overhead", ctx.note(
        f"no-op model, 2 replicas, closed loop at concurrency 1, {ctx.seconds + 1:g} s per run"
        f" after 0.5 s warm-up; direct calls go to both replicas in turn, as the router does;"
        f" median of {ctx.repeats} interleaved repeats"),
        ["figure", "median", "spread (min-max)", "target", "meets"], rows)


def item_b(ctx: Context) -> None:
    from jupyter_mlcloud.serving.security import self_signed, write_private

    ep = ctx.endpoint("bench-noop")
    ours = ctx.target(ep)
    tls = write_private(self_signed(["127.0.0.1"]))
    try:
        with bare_app(tls, ep.token) as bare_url, _maybe_ray(tls) as (ray_urls, ray_problem):
            systems = {"mlc.serve (ours), 2 replicas": ours,
                       "bare uvicorn+Starlette, 1 process": Target(
                           [bare_url], ep.token, tls.ca_file, ours.body)}
            for label, url in ray_urls.items():
                systems[label] = Target([url], ep.token, tls.ca_file, ours.body)
            for target in systems.values():  # warm: imports, connections, first batches
                closed(target, 0.5, 8, warmup=0.2)
            rates: dict[tuple[str, int], list[float]] = {}
            errors: dict[str, int] = {}
            for _ in range(ctx.repeats):
                for concurrency in (8, 64):
                    for label, target in systems.items():
                        got = closed(target, ctx.seconds, concurrency)
                        rates.setdefault((label, concurrency), []).append(got["rate"])
                        errors[label] = errors.get(label, 0) + sum(got["errors"].values())
    finally:
        tls.remove()
    if ray_problem:
        print(f"Ray Serve could not run here ({ray_problem}); its columns say n/a.")
    rows = []
    mine = "mlc.serve (ours), 2 replicas"
    for concurrency in (8, 64):
        for label in [*systems, *([] if ray_urls else ["Ray Serve"])]:
            values = rates.get((label, concurrency), [])
            if label == mine:
                rows.append([f"{label}, concurrency {concurrency}",
                             fmt(statistics.median(values), ",.0f"), spread(values, ",.0f"),
                             "", "", "", ""])
                continue
            if not values:
                rows.append([f"{label}, concurrency {concurrency}", "n/a", "n/a", "n/a", "n/a",
                             ">= 10", ""])
                continue
            ratios = [o / p for o, p in zip(rates[(mine, concurrency)], values, strict=True)]
            limit = 10.0 if label.startswith("Ray") else 0.25
            rows.append([f"{label}, concurrency {concurrency}",
                         fmt(statistics.median(values), ",.0f"), spread(values, ",.0f"),
                         fmt(statistics.median(ratios)), spread(ratios), f">= {limit:g}",
                         meets(statistics.median(ratios) >= limit)])
    failed = ", ".join(f"{k}: {v}" for k, v in errors.items() if v) or "none"
    table("b. No-op model throughput", ctx.note(
        f"closed loop, {ctx.seconds:g} s per run after 0.5 s warm-up, median of {ctx.repeats}"
        " interleaved repeats; ours / peer is the median of the per-repeat ratios; Ray Serve"
        " deployments with num_cpus=0 and max_ongoing_requests=64, behind its HTTPS proxy;"
        f" failed requests: {failed}"),
        ["system", "requests/s", "spread", "ours / it", "ratio spread", "target", "meets"],
        rows)


@contextmanager
def _maybe_ray(tls: Any) -> Iterator[tuple[dict[str, str], str | None]]:
    try:
        context = ray_serve(tls)
        urls = context.__enter__()
    except Exception as e:
        yield {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return
    try:
        yield urls, None
    finally:
        context.__exit__(None, None, None)


def item_c(ctx: Context) -> None:
    batched, single = ctx.endpoint("bench-mlp"), ctx.endpoint("bench-mlp-b1")
    # Through the URL (the figure), and straight to the replicas (the batcher alone).
    ways = {("32", "url"): ctx.target(batched), ("1", "url"): ctx.target(single),
            ("32", "direct"): ctx.target(batched, direct=True),
            ("1", "direct"): ctx.target(single, direct=True)}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in ways}
    for target in ways.values():
        closed(target, 0.5, 64, warmup=0.2)
    for _ in range(ctx.repeats):
        for key, target in ways.items():
            runs[key].append(closed(target, ctx.seconds, 64))
    after = batched.stats()
    errors = sum(sum(r["errors"].values()) for v in runs.values() for r in v)
    rows = []
    for way, label in (("url", "through the URL"), ("direct", "straight to the replicas")):
        thr = {b: [r["rate"] for r in runs[(b, way)]] for b in ("32", "1")}
        p95 = {b: [ms(r["lat"], 0.95) for r in runs[(b, way)]] for b in ("32", "1")}
        speedup = [a / b for a, b in zip(thr["32"], thr["1"], strict=True)]
        latency = [a / b for a, b in zip(p95["32"], p95["1"], strict=True)]
        bold = "**" if way == "url" else ""
        rows += [
            [f"{label}: requests/s, max_batch_size=32 / 1",
             f"{statistics.median(thr['32']):,.0f} / {statistics.median(thr['1']):,.0f}",
             f"{spread(thr['32'], ',.0f')} / {spread(thr['1'], ',.0f')}", "", ""],
            [f"{bold}{label}: throughput ratio 32 / 1{bold}", fmt(statistics.median(speedup)),
             spread(speedup), ">= 3" if bold else "",
             meets(statistics.median(speedup) >= 3) if bold else ""],
            [f"{label}: p95 ms, max_batch_size=32 / 1",
             f"{statistics.median(p95['32']):.1f} / {statistics.median(p95['1']):.1f}",
             f"{spread(p95['32'], '.1f')} / {spread(p95['1'], '.1f')}", "", ""],
            [f"{bold}{label}: p95 ratio 32 / 1{bold}", fmt(statistics.median(latency)),
             spread(latency), "<= 2" if bold else "",
             meets(statistics.median(latency) <= 2) if bold else ""],
        ]
    rows.append(["mean rows per batch through the URL, max_batch_size=32 (the router's figure)",
                 fmt(after.get("batch_size_mean")), "", "", ""])
    table("c. Batching at saturation", ctx.note(
        "MLP 64-256-256-10, one row per request, 2 replicas, max_wait_ms=5, closed loop at"
        f" concurrency 64, {ctx.seconds:g} s per run after 0.5 s warm-up, median of"
        f" {ctx.repeats} interleaved repeats; the target is through the URL; failed"
        f" requests: {errors}"),
        ["figure", "median", "spread (min-max)", "target", "meets"], rows)


def item_d(ctx: Context) -> None:
    ep = ctx.endpoint("bench-mlp")
    ways = {"url": ctx.target(ep), "direct": ctx.target(ep, direct=True)}
    got: dict[tuple[str, int], list[dict[str, Any]]] = {
        (w, c): [] for w in ways for c in (1, 64)}
    closed(ways["url"], 0.5, 64, warmup=0.2)
    for _ in range(ctx.repeats):
        for way, target in ways.items():
            for concurrency in (1, 64):
                got[(way, concurrency)].append(closed(target, ctx.seconds, concurrency))
    rows = []
    for way, label in (("url", "through the URL"), ("direct", "straight to the replicas")):
        p99 = {c: [ms(r["lat"], 0.99) for r in got[(way, c)]] for c in (1, 64)}
        for c in (1, 64):
            p50 = statistics.median(ms(r["lat"], 0.5) for r in got[(way, c)])
            rate = statistics.median(r["rate"] for r in got[(way, c)])
            rows.append([f"{label}, concurrency {c}: p50 ms / p99 ms / requests/s",
                         f"{p50:.2f} / {statistics.median(p99[c]):.2f} / {rate:,.0f}",
                         f"p99 {spread(p99[c])}", "", ""])
        ratio = [a / b for a, b in zip(p99[64], p99[1], strict=True)]
        bold = "**" if way == "url" else ""
        rows.append([f"{bold}{label}: p99 ratio, concurrency 64 / 1{bold}",
                     fmt(statistics.median(ratio)), spread(ratio), "<= 5" if bold else "",
                     meets(statistics.median(ratio) <= 5) if bold else ""])
    table("d. Tail latency under concurrency", ctx.note(
        "MLP 64-256-256-10, max_batch_size=32, 2 replicas, closed loop,"
        f" {ctx.seconds:g} s per run after 0.5 s warm-up, median of {ctx.repeats} interleaved"
        " repeats; the target is through the URL (in a closed loop, latency ="
        " concurrency / throughput)"),
        ["figure", "median", "spread (min-max)", "target", "meets"], rows)


def _routed(ep: Any) -> tuple[set[str], dict[str, Any]]:
    """The replica ids the endpoint's state lists, and the router's per-replica figures."""
    return {r["id"] for r in ep.replica_info}, ep.stats()["replicas"]


def _answers(url: str, token: str, ca_file: str, body: str) -> bool:
    """Whether one infer straight to ``url`` is answered 200 within 2 s."""
    import http.client

    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(str(parts.hostname), parts.port, timeout=2,
                                       context=ssl.create_default_context(cafile=ca_file))
    try:
        conn.request("POST", parts.path, body=body,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _time_call(fn: Callable[[], object], took: list[float]) -> None:
    """Call ``fn`` (errors ignored) and append the seconds it took to ``took``."""
    started = time.monotonic()
    try:
        fn()
    except Exception:
        pass
    took.append(time.monotonic() - started)


def item_e(ctx: Context) -> None:
    import threading

    import jupyter_mlcloud as mlc
    from jupyter_mlcloud.serving import control

    kills = 1 if ctx.quick else 2
    rate, seconds, budget = 100, 25, 60.0
    rows: list[list[str]] = []
    for k in range(kills):
        ctx.client.wait_for_workers(2, timeout=120)
        name = f"bench-heal-{k}"
        ep = mlc.serve(make_mlp(), name=name, cluster=ctx.cluster, replicas=2)
        try:
            state = control.read(ctx.client, name)
            router_worker = state["router"]["worker"]
            before = ep.replica_info
            victim = next(r for r in before if r["worker"] != router_worker)
            (pid,) = ctx.client.run(os.getpid, workers=[victim["worker"]]).values()
            retries_before = ep.stats()["retries"]
            load = Load(ctx.target(ep), mode="open", rate=rate, requests=rate * seconds,
                        connections=32, records=True)
            time.sleep(max(0.0, load.t0 + 3.0 - time.monotonic()))
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            stats_took: list[float] = []  # what ep.stats() costs a user right after the kill
            timer = threading.Thread(target=_time_call, args=(ep.stats, stats_took),
                                     daemon=True)
            timer.start()
            back = rejoined = None
            known = {r["id"] for r in before}
            while time.monotonic() - killed < budget and (back is None or rejoined is None):
                now = time.monotonic()
                alive = control.workers(ctx.client)
                if rejoined is None and len(alive) >= 2 and victim["worker"] not in alive:
                    rejoined = now - killed
                if back is None:
                    # The state lists a replica once it answers and the router routes to it
                    # (the controller publishes after routing); check it answers directly.
                    info = ep.replica_info
                    new = [r for r in info if r["id"] not in known]
                    if (len(info) == 2 and victim["id"] not in {r["id"] for r in info}
                            and all(r["worker"] in alive for r in info) and all(
                                _answers(f"{r['url']}/v2/models/{name}/infer", ep.token,
                                         ep.ca_file, body_of(MLP_FEATURES)) for r in new)):
                        back = now - killed
                time.sleep(0.1)
            got = load.result()
            timer.join(60)
            retries = ep.stats()["retries"] - retries_before
        finally:
            ep.close()
        failed = sum(got["errors"].values())
        lat = got["lat"]
        rows.append([f"kill {k + 1}: failed requests of {got['requests']}", str(failed),
                     "0", meets(failed == 0)])
        rows.append([f"kill {k + 1}: SIGKILL -> a new replica routed and answering (s)",
                     fmt(back) if back is not None else f"not within {budget:g} s", "<= 15",
                     meets(back is not None and back <= 15)])
        rows.append([f"kill {k + 1}: SIGKILL -> restarted worker joined (s)", fmt(rejoined),
                     "", ""])
        rows.append([f"kill {k + 1}: p50 / p99 / max latency over the run (ms)",
                     f"{ms(lat, 0.5):.1f} / {ms(lat, 0.99):.1f} / {1000 * max(lat):.0f}", "",
                     ""])
        rows.append([f"kill {k + 1}: requests the router sent again (retries)", str(retries),
                     "", ""])
        rows.append([f"kill {k + 1}: ep.stats() called at the kill returned after (s)",
                     fmt(stats_took[0]) if stats_took else "not within 60 s", "", ""])
        if got["errors"]:
            rows.append([f"kill {k + 1}: failures by kind",
                         ", ".join(f"{e}: {n}" for e, n in got["errors"].items()), "", ""])
    table("e. SIGKILL of a replica's worker under load", ctx.note(
        f"MLP 64-256-256-10, 2 replicas, open loop at {rate} requests/s over 32 connections"
        f" for {seconds} s; the worker process of the replica not beside the router is"
        " SIGKILLed 3 s in; its nanny starts a new worker and the endpoint controller replaces"
        " the replica (back: the endpoint's state lists 2 replicas on live workers, the new"
        f" one answering a direct call); {kills} kill(s), each on a fresh endpoint"),
        ["figure", "value", "target", "meets"], rows)
    ctx.client.wait_for_workers(2, timeout=120)


def item_f(ctx: Context) -> None:
    ep = ctx.endpoint("bench-mlp")
    target = ctx.target(ep)
    repeats = 1 if ctx.quick else 2
    shares: list[float] = []
    last_new: list[float] = []
    returned: list[float] = []
    errors = 0
    total = 0
    for rep in range(repeats):
        old = ep.versions[-1]["version"]
        ep.update(make_mlp(seed=100 + rep), canary=0.1)
        new = ep.versions[-1]["version"]
        got = Load(target, mode="closed", phases=[[120, 8]], requests=10_000,
                   records=True).result()
        answered = [r[3] for r in got["records"] if r[2] == 200]
        shares.append(100.0 * answered.count(str(new)) / max(len(answered), 1))
        errors += sum(got["errors"].values())
        total += got["requests"]
        load = Load(target, mode="closed", warmup=0.0, phases=[[4.0, 8]], records=True)
        time.sleep(max(0.0, load.t0 + 1.0 - time.monotonic()))
        called = time.monotonic()
        ep.rollback()
        returned.append(time.monotonic() - called)
        got = load.result()
        errors += sum(got["errors"].values())
        total += got["requests"]
        late = [r[1] for r in got["records"] if r[3] == str(new)]
        last_new.append(max([t - called for t in late if t > called], default=0.0))
        after = {r[3] for r in got["records"] if r[0] >= called + 1.0}
        assert after <= {str(old)}, f"answers after rollback from versions {after}"
    off = [abs(s - 10.0) for s in shares]
    rows = [
        ["share answered by the new version (%)", fmt(statistics.median(shares)),
         spread(shares), "10 +/- 1.5", meets(max(off) <= 1.5)],
        ["rollback() called -> last answer by the new version (s)",
         fmt(statistics.median(last_new), ".3f"), spread(last_new, ".3f"), "<= 1",
         meets(max(last_new) <= 1.0)],
        ["rollback() call -> return (s)", fmt(statistics.median(returned), ".3f"),
         spread(returned, ".3f"), "", ""],
        [f"failed requests (of {total:,})", str(errors), "", "0", meets(errors == 0)],
    ]
    table("f. Canary and rollback", ctx.note(
        "MLP 64-256-256-10, max_batch_size=32, 2 replicas per version;"
        " ep.update(model, canary=0.1), then 10,000 requests in a closed loop at concurrency"
        " 8; then ep.rollback() 1 s into a 4 s closed loop at concurrency 8 (every request"
        f" sent 1 s after the call or later was answered by the old version); {repeats}"
        " repeat(s)"),
        ["figure", "median", "spread (min-max)", "target", "meets"], rows)


def item_g(ctx: Context) -> None:
    import psutil

    from jupyter_mlcloud.serving import control

    ep = ctx.endpoint("bench-noop")
    total = 20_000 if ctx.quick else 200_000
    every = total // 20
    state = control.read(ctx.client, ep.name)
    router_worker = state["router"]["worker"]
    pids = ctx.client.run(os.getpid)
    roles = {}
    for r in ep.replica_info:
        roles.setdefault(r["worker"], "replica")
    roles[router_worker] = "router + replica"
    procs = {w: psutil.Process(pids[w]) for w in roles}
    samples: list[dict[str, int]] = []
    load = Load(ctx.target(ep), mode="closed", phases=[[1800, 8]], requests=total,
                progress=every)
    while load.next_progress() is not None:
        samples.append({w: p.memory_info().rss for w, p in procs.items()})
    got = load.result()
    base, end = samples[1], samples[-1]  # after the first tenth, and at the end
    try:  # what replicas keep by design, bounded (delayed labels)
        from jupyter_mlcloud.monitoring.window import PREDICTIONS

        kept = (f"; by design each replica keeps the outputs of its last {PREDICTIONS:,}"
                " requests (for delayed labels)")
    except ImportError:
        kept = ""
    rows = []
    for w, role in sorted(roles.items(), key=lambda x: x[1], reverse=True):
        growth = 100.0 * (end[w] / base[w] - 1.0)
        peak = max(s[w] for s in samples[1:])
        rows.append([f"{role} worker RSS (MiB): at {2 * every:,} / at {total:,} / peak",
                     f"{base[w] / 2**20:.1f} / {end[w] / 2**20:.1f} / {peak / 2**20:.1f}",
                     f"{growth:+.2f} %", "<= 5 %", meets(growth <= 5.0)])
    rows.append([f"failed requests (of {got['requests']:,})",
                 str(sum(got["errors"].values())), "", "0",
                 meets(not got["errors"])])
    table("g. Memory over many requests", ctx.note(
        f"no-op model, 2 replicas, {total:,} requests in a closed loop at concurrency 8"
        f" ({got['rate']:,.0f} requests/s); RSS of the worker processes hosting the router"
        f" and the replicas, sampled every {every:,} answers; growth from {2 * every:,}"
        f" (warm) to the end{kept}"),
        ["figure", "value", "growth", "target", "meets"], rows)
    for w, role in sorted(roles.items(), key=lambda x: x[1], reverse=True):
        print(f"{role} worker RSS (MiB) every {every:,} answers:",
              " ".join(f"{s[w] / 2**20:.0f}" for s in samples), flush=True)


def item_h(ctx: Context) -> None:
    import jupyter_mlcloud as mlc

    base, step, after = 5.0, 12.0, 16.0
    up_delay, down_delay = 1.0, 3.0
    repeats = 1
    rows: list[list[str]] = []
    changes: list[str] = []
    for rep in range(repeats):
        ep = mlc.serve(make_mlp(), name=f"bench-auto-{rep}", cluster=ctx.cluster,
                       autoscale="1:4")
        try:
            ep.set_autoscale("1:4", up_delay_s=up_delay, down_delay_s=down_delay)
            first = {r["id"] for r in ep.replica_info}
            load = Load(ctx.target(ep), mode="closed", warmup=0.0,
                        phases=[[base, 4], [step, 16], [after, 4]], records=True)
            stepped, dropped = load.t0 + base, load.t0 + base + step
            serving = down = home = None
            peak = 1
            timeline: list[tuple[float, int]] = []
            while time.monotonic() < dropped + after + 30:
                now = time.monotonic()
                try:
                    ids, routed = _routed(ep)
                except Exception:
                    time.sleep(0.25)
                    continue
                n = len(routed)
                if now >= stepped and serving is None and any(
                        i not in first and v["requests"] > 0 for i, v in routed.items()):
                    serving = now - stepped
                if now >= dropped and down is None and timeline and n < timeline[-1][1]:
                    down = now - dropped  # the first step down after the load fell
                if not timeline or timeline[-1][1] != n:
                    timeline.append((now - stepped, n))
                peak = max(peak, n)
                if now >= dropped and n == 1:
                    home = now - dropped
                    break
                time.sleep(0.25)
            got = load.result()
        finally:
            ep.close()
        failed = sum(got["errors"].values())
        tag = f"run {rep + 1}: " if repeats > 1 else ""
        changes.append(f"{tag}" + ", ".join(f"{t:+.1f} s: {n}" for t, n in timeline))
        rows += [
            [f"{tag}load x4 (concurrency 4 -> 16) -> a new replica answering (s)",
             fmt(serving) if serving is not None else "never", "<= 10",
             meets(serving is not None and serving <= 10)],
            [f"{tag}replicas at the peak", str(peak), "", ""],
            [f"{tag}load back to 4 -> first replica removed (s)", fmt(down),
             f"~ down_delay_s = {down_delay:g}", ""],
            [f"{tag}load back to 4 -> back to 1 replica (s)", fmt(home),
             f"~ 3 x {down_delay:g}", ""],
            [f"{tag}failed requests (of {got['requests']:,})", str(failed), "0",
             meets(failed == 0)],
        ]
    table("h. Autoscale 1:4", ctx.note(
        f"MLP 64-256-256-10, max_batch_size=32; autoscale='1:4' with target 4 in flight per"
        f" replica, up_delay_s={up_delay:g}, down_delay_s={down_delay:g}; closed loop at"
        f" concurrency 4 for {base:g} s, 16 for {step:g} s, 4 for {after:g} s; replicas read"
        " from the router every 0.25 s"),
        ["figure", "value", "target", "meets"], rows)
    print("replicas routed over time (seconds from the step up: count):",
          "; ".join(changes), flush=True)


def _first_200(url: str, token: str, ca_file: str, body: str) -> None:
    import http.client

    parts = urlsplit(url)
    context = ssl.create_default_context(cafile=ca_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        conn = http.client.HTTPSConnection(str(parts.hostname), parts.port, context=context,
                                           timeout=30)
        try:
            conn.request("POST", parts.path, body=body,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.005)
    raise RuntimeError(f"{url} did not answer 200 within 60 s")


def item_i(ctx: Context) -> None:
    import jupyter_mlcloud as mlc

    repeats = ctx.repeats
    first: list[float] = []
    returned: list[float] = []
    closing: list[float] = []
    body = body_of(MLP_FEATURES)
    for rep in range(repeats + 1):  # the first warms the workers (imports, model load path)
        started = time.monotonic()
        ep = mlc.serve(make_mlp(), name=f"bench-first-{rep}", cluster=ctx.cluster, replicas=2)
        back = time.monotonic()
        _first_200(ep.infer_url(), ep.token, ep.ca_file, body)
        answered = time.monotonic()
        ep.close()
        if rep:
            first.append(answered - started)
            returned.append(back - started)
            closing.append(time.monotonic() - answered)
    ep = ctx.endpoint("bench-mlp")
    target = ctx.target(ep)
    new_first: list[float] = []
    update_returned: list[float] = []
    shares: list[float] = []
    errors = 0
    for rep in range(repeats):
        load = Load(target, mode="closed", warmup=0.0, phases=[[5.0, 4]], records=True)
        time.sleep(max(0.0, load.t0 + 1.0 - time.monotonic()))
        called = time.monotonic()
        ep.update(make_mlp(seed=200 + rep), canary=0.1)
        update_returned.append(time.monotonic() - called)
        new = str(ep.versions[-1]["version"])
        got = load.result()
        errors += sum(got["errors"].values())
        ok = [r for r in got["records"] if r[2] == 200]
        answered_new = [r[1] for r in ok if r[3] == new]
        if answered_new:
            t = min(answered_new)
            new_first.append(t - called)
            later = [r for r in ok if r[1] >= t]
            shares.append(100.0 * sum(r[3] == new for r in later) / len(later))
        ep.rollback()
    rows = [
        ["mlc.serve() call -> first 200 answer (s)", fmt(statistics.median(first)),
         spread(first), "<= 3", meets(statistics.median(first) <= 3)],
        ["mlc.serve() call -> return (s)", fmt(statistics.median(returned)), spread(returned),
         "", ""],
        ["ep.close() (s)", fmt(statistics.median(closing)), spread(closing), "", ""],
        ["ep.update(canary=0.1) call -> first answer by the new version (s)",
         fmt(statistics.median(new_first)) if new_first else "never", spread(new_first),
         "<= 2", meets(bool(new_first) and statistics.median(new_first) <= 2)],
        ["ep.update() call -> return (s)", fmt(statistics.median(update_returned)),
         spread(update_returned), "", ""],
        ["new version's share of the answers from then on (%)",
         fmt(statistics.median(shares), ".1f") if shares else "n/a", spread(shares, ".1f"),
         "10", ""],
        ["failed requests during the updates", str(errors), "", "0", meets(errors == 0)],
    ]
    table("i. Time to serve and to update", ctx.note(
        "MLP 64-256-256-10, 2 replicas, warm workers (one unmeasured serve first);"
        " the first answer is polled with a fresh HTTPS connection; updates run under a"
        f" closed loop at concurrency 4, each rolled back after; median of {repeats} repeats"),
        ["figure", "median", "spread (min-max)", "target", "meets"], rows)


def item_j(ctx: Context) -> None:
    import numpy as np

    import jupyter_mlcloud as mlc

    plain = ctx.endpoint("bench-mlp")
    if "bench-mlp-watched" not in ctx.endpoints:
        ctx.endpoints["bench-mlp-watched"] = mlc.serve(
            make_mlp(), name="bench-mlp-watched", cluster=ctx.cluster, replicas=2,
            max_batch_size=32, max_wait_ms=5,
            reference=np.random.default_rng(0).normal(size=(2000, MLP_FEATURES)),
            monitor={"every_s": 1})
    watched = ctx.endpoints["bench-mlp-watched"]
    targets = {"off": ctx.target(plain), "on": ctx.target(watched)}
    rows = []
    errors = 0
    for concurrency in (8, 64):
        for target in targets.values():
            closed(target, 0.5, concurrency, warmup=0.2)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(ctx.repeats):
            for label, target in targets.items():
                run = closed(target, ctx.seconds, concurrency)
                rates[label].append(run["rate"])
                errors += sum(run["errors"].values())
        ratio = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
        rows += [
            [f"requests/s at concurrency {concurrency}, monitoring on / off",
             f"{statistics.median(rates['on']):,.0f} / {statistics.median(rates['off']):,.0f}",
             f"{spread(rates['on'], ',.0f')} / {spread(rates['off'], ',.0f')}", "", ""],
            [f"**throughput ratio on / off, concurrency {concurrency}**",
             fmt(statistics.median(ratio)), spread(ratio), ">= 0.95",
             meets(statistics.median(ratio) >= 0.95)],
        ]
    drift = watched.drift()
    rows.append(["rows in the watched window at the end (drift computed on them)",
                 str(int(drift["n_current"].max())), "", "", ""])
    table("j. Monitoring on vs off", ctx.note(
        "MLP 64-256-256-10, one row per request, 2 replicas each, max_batch_size=32; the"
        " watched endpoint keeps every request's rows and outputs (window 5,000 rows) and the"
        f" controller computes drift every second; {ctx.seconds:g} s per run after 0.5 s"
        f" warm-up, median of {ctx.repeats} interleaved repeats; failed requests: {errors}"),
        ["figure", "median", "spread (min-max)", "target", "meets"], rows)


ITEM_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "a": item_a, "b": item_b, "c": item_c, "d": item_d, "e": item_e, "f": item_f,
    "g": item_g, "h": item_h, "i": item_i, "j": item_j}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=ITEMS, help="items to run, e.g. a,b,e (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter repeats; 20,000 requests for g")
    parser.add_argument("--repeats", type=int, help="repeats per comparison (4; quick 3)")
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main()
        return
    if args.bare:
        bare_main(*args.bare)
        return
    wanted = {c for c in args.only.replace(",", "") if c.strip()}
    unknown = wanted - set(ITEMS)
    if unknown:
        parser.error(f"--only takes letters among {', '.join(ITEMS)}; got"
                     f" {', '.join(sorted(unknown))}.")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")  # no stray discovery
        import jupyter_mlcloud as mlc

        started = time.monotonic()
        print(f"bench_serve: items {', '.join(sorted(wanted))}{' (quick)' if args.quick else ''};"
              f" 1/5/15-min load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
              flush=True)
        with mlc.up(workers=2, gpu=False, name="bench-serve") as cluster:
            cluster.client.wait_for_workers(2)
            ctx = Context(cluster, args.quick, args.repeats or (3 if args.quick else 4),
                          2.0 if args.quick else 2.5)
            try:
                for item in RUN_ORDER:
                    if item in wanted:
                        ITEM_FUNCTIONS[item](ctx)
            finally:
                for ep in ctx.endpoints.values():
                    ep.close()
        print(f"bench_serve: {time.monotonic() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
