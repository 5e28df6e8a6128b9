"""Shared fixtures: an isolated Jupyter runtime dir, and checks that nothing is left behind."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import socket
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import psutil
import pytest

if TYPE_CHECKING:
    import torch

pytest_plugins = ("pytest_jupyter.jupyter_server",)

# Ranks and workers share 2 cores: keep each process to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers an HTTP GET (any status below 400) within ``timeout``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True, scope="session")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Runs are tracked by default: the whole session records into one MLflow store in a
    temp dir (never the working directory). Tests of tracking itself use stores of their own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own Jupyter runtime dir, inherited by the processes it starts."""
    path = tmp_path / "runtime"
    path.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def no_cluster_left() -> Iterator[None]:
    """Every test must close what it opened: clusters, worker processes, discovery files."""
    from jupyter_mlcloud.cluster import api as clusters

    before = set(clusters.handles())  # module-scoped clusters live on
    yield
    leftovers = [h for h in clusters.handles() if h not in before and h not in SHARED]
    for handle in leftovers:
        handle.close()
    assert not leftovers, f"test left clusters open: {[h.name for h in leftovers]}"


def child_processes() -> list[psutil.Process]:
    """Live child processes of this test process (workers), but multiprocessing's own
    resource tracker, which lives as long as the test process by design."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def discovery_files() -> list[Path]:
    from jupyter_mlcloud.cluster.discovery import discovery_dir

    folder = discovery_dir()
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------- a cluster per test module

SHARED: set[Any] = set()  # handles of module clusters: they outlive single tests
WHOLE_WAIT_S = 60.0  # revive-after (15 s) with room for a slow machine


def worker_states(cluster: Any) -> dict[Any, tuple[str, str]]:
    """Each nanny's status and its worker process's status, for failure messages."""
    return {name: (str(nanny.status), str(getattr(nanny.process, "status", None)))
            for name, nanny in cluster.cluster.workers.items()}


def wait_for_workers(cluster: Any, n: int, timeout: float = WHOLE_WAIT_S) -> None:
    """Until the scheduler has ``n`` workers; fail naming each nanny's state."""
    from jupyter_mlcloud.cluster import info as cluster_info

    deadline = time.monotonic() + timeout
    while len(cluster_info.workers(cluster.client)) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(cluster_info.workers(cluster.client))} of {n} workers were"
                        f" there after {timeout:g} s; nanny, process: {worker_states(cluster)}")
        time.sleep(0.1)


class ModuleCluster:
    """The cluster a test module shares. :meth:`whole` hands it out with every worker up; one
    whose workers do not come back is replaced, and the replacement is reported, so one
    broken test stays one failure instead of failing every test after it."""

    def __init__(self, name: str, workers: int, config: dict[str, Any], runtime: Path) -> None:
        self.name, self.workers, self.config = name, workers, config
        self.runtime = runtime  # its own discovery dir: no other test run sees its name
        self.replaced = 0
        self.handle = self._start()

    @contextlib.contextmanager
    def _own_runtime_dir(self) -> Iterator[None]:
        saved = os.environ.get("JUPYTER_RUNTIME_DIR")
        os.environ["JUPYTER_RUNTIME_DIR"] = str(self.runtime)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("JUPYTER_RUNTIME_DIR", None)
            else:
                os.environ["JUPYTER_RUNTIME_DIR"] = saved

    def _start(self) -> Any:
        import jupyter_mlcloud as mlc

        with dask.config.set(self.config), self._own_runtime_dir():
            handle = mlc.up(workers=self.workers, name=self.name)
        SHARED.add(handle)
        return handle

    def whole(self) -> Any:
        """The cluster, once all its workers are up (a replacement if they never are)."""
        from jupyter_mlcloud.cluster import info as cluster_info

        deadline = time.monotonic() + WHOLE_WAIT_S
        while len(cluster_info.workers(self.handle.client)) < self.workers:
            if time.monotonic() > deadline:
                have = len(cluster_info.workers(self.handle.client))
                message = (f"cluster {self.name!r} had {have} of {self.workers} workers"
                           f" {WHOLE_WAIT_S:g} s after the test before;"
                           f" nanny, process: {worker_states(self.handle)}. Started a new one.")
                print(message, file=sys.stderr)
                warnings.warn(message, stacklevel=1)
                self.close()
                self.replaced += 1
                self.handle = self._start()
                deadline = time.monotonic() + WHOLE_WAIT_S
            time.sleep(0.1)
        return self.handle

    def close(self) -> None:
        SHARED.discard(self.handle)
        with self._own_runtime_dir():
            self.handle.close()


@contextlib.contextmanager
def ipython_shell() -> Iterator[Any]:
    """An IPython shell with the extension loaded, dropped on the way out.

    Its exit hook is dropped too: left registered, every shell the suite made ran it at
    interpreter exit, each one collecting the by-then large heap (minutes before pytest exits).
    """
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    try:
        ip.run_line_magic("load_ext", "jupyter_mlcloud")
        yield ip
    finally:
        atexit.unregister(ip.atexit_operations)
        InteractiveShell.clear_instance()


@pytest.fixture
def shell() -> Iterator[Any]:
    """An IPython shell with the extension loaded (a module may define its own)."""
    with ipython_shell() as ip:
        yield ip


@pytest.fixture(scope="module")
def module_cluster(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleCluster]:
    """The module's shared cluster, as its ``CLUSTER`` dict says (name, workers, config)."""
    spec = dict(getattr(request.module, "CLUSTER", {}))
    name = spec.get("name", request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    config = {"mlcloud.train.replace-timeout": 120, **spec.get("config", {})}
    box = ModuleCluster(name, spec.get("workers", 2), config, tmp_path_factory.mktemp("runtime"))
    with dask.config.set(config):
        yield box
    box.close()


@pytest.fixture
def cluster(module_cluster: ModuleCluster) -> Any:
    """The module's cluster with every worker up, at the start of each test."""
    return module_cluster.whole()


# ---------------------------------------------------------------- training helpers


def make_fit(kills: tuple[tuple[int, int, int], ...] = (), epochs: int = 3,
             gate: str | None = None, commit_every: int = 1) -> Callable[..., Any]:
    """A small float64 MLP with dropout, momentum and an LR schedule: everything a resume
    must restore. ``kills``: (attempt, rank, step) at which that rank SIGKILLs its own worker,
    once the launcher holds the last commit before it (one every ``commit_every`` steps).
    ``gate``: at step 12 of the first attempt, rank 0 waits until that file exists."""

    def fit(ctx: Any) -> Any:
        import os
        import signal
        import time

        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        ddp = ctx.prepare(model, optimizer, scheduler)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=g, dtype=torch.float64)
        y = x.sum(1, keepdim=True).sin()
        for _ in ctx.epochs(epochs):
            for xb, yb in ctx.shard((x, y), batch_size=16):
                loss = torch.nn.functional.mse_loss(ddp(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ctx.report(loss=loss)
                if (ctx.attempt, ctx.rank, ctx.step) in kills:
                    while ctx.committed_step < (ctx.step - 1) // commit_every * commit_every:
                        time.sleep(0.01)
                    os.kill(os.getpid(), signal.SIGKILL)
                if gate and ctx.attempt == 0 and ctx.rank == 0 and ctx.step == 12:
                    while not os.path.exists(gate):
                        time.sleep(0.02)
            scheduler.step()
        return model

    return fit


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def keep_rank1_worker_dead(cluster: Any) -> None:
    """Once killed, rank 1's worker is not restarted (no replacement comes), by its nanny or
    by the cluster's revive watcher."""
    from jupyter_mlcloud.cluster import info as cluster_info

    async def stay_dead() -> None:
        return None

    victim = sorted(cluster_info.workers(cluster.client))[1]
    for name, nanny in cluster.cluster.workers.items():
        if nanny.worker_address == victim:
            nanny.instantiate = stay_dead
            cluster.cluster.worker_spec.pop(name)  # the watcher revives only what the spec names


def read_line(process: Any, timeout: float = 120.0, what: str = "a line") -> str:
    """The next line the child ``process`` prints; fail (and end it) after ``timeout``."""
    import threading

    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got:
        process.kill()
        pytest.fail(f"the child process printed no {what} within {timeout:g} s")
    return got[0]


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """A process spinning on one core for as long as the block runs: a user's busy machine."""
    import subprocess

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait(10)


class MetadataServer:
    """A cloud metadata service on 127.0.0.1, as the preemption notice asks it: GCP's
    ``preempted`` flag (``/gcp``), Azure's scheduled events (``/azure``), AWS's spot
    instance-action behind an IMDSv2 token (``/latest/...``), and ``/notice/<name>`` (404
    until ``name`` is in ``preempted``). Each answer checks the headers the real one needs."""

    TOKEN = "imds-token"

    def __init__(self) -> None:
        import http.server
        import threading

        self.preempted: set[str] = set()  # "gcp", "azure", "aws", or worker names
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def _answer(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's name
                ok = self.path == "/latest/api/token" and \
                    self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._answer(200, server.TOKEN.encode()) if ok else self._answer(400)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                import json

                path, notice = self.path, server.preempted
                if path == "/gcp":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._answer(403)
                    return self._answer(200, b"TRUE" if "gcp" in notice else b"FALSE")
                if path == "/azure":
                    if self.headers.get("Metadata") != "true":
                        return self._answer(400)
                    events = [{"EventType": "Preempt"}] if "azure" in notice else \
                        [{"EventType": "Freeze"}]
                    return self._answer(200, json.dumps({"Events": events}).encode())
                if path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != server.TOKEN:
                        return self._answer(401)
                    return self._answer(200, b'{"action": "terminate"}') if "aws" in notice \
                        else self._answer(404)
                if path.startswith("/notice/"):
                    return self._answer(200 if path[len("/notice/"):] in notice else 404)
                return self._answer(404)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def metadata_server() -> Iterator[MetadataServer]:
    """A :class:`MetadataServer` on loopback, shut down after the test."""
    server = MetadataServer()
    yield server
    server.close()
