"""``Run``: a training run in flight, as the notebook sees it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from .. import metrics
from .worker import RankFailed, cancel_rank

# Errors a rank raises only because another rank failed first.
_CONSEQUENTIAL = ("RunCancelled", "Connection closed by peer", "Connection reset by peer",
                  "Broken pipe", "gloo", "Timed out waiting")
CANCEL_GRACE_S = 30.0  # how long cancelled ranks get to tear down before we stop waiting
DEPARTURE_GRACE_S = 5.0  # how long the scheduler gets to notice a dead worker


def _consequential(exc: BaseException) -> bool:
    return any(s in str(exc) for s in _CONSEQUENTIAL)


class TrainingError(RuntimeError):
    """A rank failed; the message is that rank's traceback, each line tagged with its rank."""

    def __init__(self, text: str, rank: int | None = None) -> None:
        super().__init__(text)
        self.rank = rank

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of the launcher's own (irrelevant) stack.
        return [f"TrainingError: rank {self.rank} failed", *str(self).splitlines()]


class Run:
    """A data-parallel training run: one task per rank on pinned workers.

    ``result()`` waits and returns rank 0's result; ``cancel()`` stops every rank;
    ``status`` is pending, running, finished, error or cancelled; ``metrics`` is a DataFrame
    of every ``ctx.report`` point; ``logs`` every line the ranks printed.
    """

    def __init__(self, run_id: str, client: Any, workers: list[str]) -> None:
        self.id = run_id
        self.client = client
        self.workers = workers  # rank r runs on workers[r]
        self.world_size = len(workers)
        self.started = time.time()
        self.finished: float | None = None
        self.events: list[dict[str, Any]] = []
        self._futures: list[Any] = []
        self._points: list[dict[str, Any]] = []
        self._lines: list[dict[str, Any]] = []
        self._status = "pending"
        self._error: TrainingError | None = None
        self._result: Any = None
        self._done = threading.Event()
        self._listeners: list[Callable[[str, list[dict[str, Any]]], None]] = []
        self._lock = threading.Lock()
        self._payload: Any = None

    # ------------------------------------------------------------ wiring (launcher)

    def subscribe(self) -> None:
        """Start receiving metrics and output; call before any rank starts."""
        self.client.subscribe_topic(metrics.metrics_topic(self.id), self._on_metrics)
        self.client.subscribe_topic(metrics.logs_topic(self.id), self._on_logs)

    def start(self, futures: list[Any], payload: Any) -> None:
        """Watch the rank futures (in a thread) until every rank is done."""
        self._futures, self._payload = futures, payload
        self._status = "running"
        threading.Thread(target=self._watch, name=f"watch-{self.id}", daemon=True).start()

    def add_listener(self, listener: Callable[[str, list[dict[str, Any]]], None]) -> None:
        """``listener(kind, items)`` with kind ``"metrics"`` or ``"logs"``, from any thread."""
        self._listeners.append(listener)

    def _on_metrics(self, event: tuple[float, Any]) -> None:
        items = metrics.items_of([event])
        with self._lock:
            self._points.extend(items)
        self._notify("metrics", items)

    def _on_logs(self, event: tuple[float, Any]) -> None:
        items = metrics.items_of([event])
        with self._lock:
            self._lines.extend(items)
        self._notify("logs", items)

    def _notify(self, kind: str, items: list[dict[str, Any]]) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, items)
            except Exception:
                pass  # a display problem must never stop the run

    # ------------------------------------------------------------ watching

    def _missing_workers(self) -> list[str]:
        try:
            alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
        except Exception:
            return []
        return [w for w in self.workers if w not in alive]

    def _watch(self) -> None:
        from distributed import wait

        try:
            while True:
                pending = [f for f in self._futures if not f.done()]
                if not pending:
                    break
                try:
                    wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
                failed = any(f.status == "error" for f in self._futures)
                if failed or self._status == "cancelling" or self._missing_workers():
                    break
            self._finish()
        except Exception as e:  # the watcher itself must always end the run
            self._error = TrainingError(f"the run's watcher failed: {e}")
            self._status = "error"
            self._close()

    def _finish(self) -> None:
        failed = [(r, f) for r, f in enumerate(self._futures) if f.status == "error"]
        cancelling = self._status == "cancelling"
        # Prefer the rank whose failure was its own, not a consequence of another's.
        errors = [(r, self._exception(f)) for r, f in failed]
        errors.sort(key=lambda e: _consequential(e[1]))
        gone = self._missing_workers()
        if errors and _consequential(errors[0][1]) and not gone:
            gone = self._wait_for_departure(DEPARTURE_GRACE_S)  # a peer's worker died?
        if failed or gone or cancelling:
            self._cancel_ranks()
            if cancelling:
                self._status = "cancelled"
                self._error = TrainingError("the run was cancelled; every rank was stopped.")
            elif errors and not (gone and _consequential(errors[0][1])):
                rank, exc = errors[0]
                self._status = "error"
                self._error = TrainingError(str(exc), rank=rank)
            else:
                rank = self.workers.index(gone[0])
                self._status = "error"
                self._error = TrainingError(
                    f"[rank {rank}] worker {gone[0]} died during the run; every other rank was"
                    " cancelled.",
                    rank=rank,
                )
        else:
            self._result = self._futures[0].result()
            self._status = "finished"
        self._close()

    def _wait_for_departure(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            gone = self._missing_workers()
            if gone:
                return gone
            time.sleep(0.1)
        return []

    @staticmethod
    def _exception(future: Any) -> BaseException:
        exc = future.exception()
        return exc if isinstance(exc, RankFailed) else RankFailed(-1, "", repr(exc))

    def _cancel_ranks(self) -> None:
        from distributed import wait

        alive = set(self.workers) - set(self._missing_workers())
        running = [(w, f) for w, f in zip(self.workers, self._futures, strict=True)
                   if not f.done()]
        for worker, future in running:
            if worker not in alive:
                future.cancel()  # its worker is gone: nothing to stop, nothing to wait for
        targets = [w for w, _ in running if w in alive]
        if targets:
            try:
                self.client.run(cancel_rank, self.id, workers=targets)
            except Exception:
                pass
            try:
                wait([f for w, f in running if w in alive], timeout=CANCEL_GRACE_S)
            except TimeoutError:
                pass
        for future in self._futures:
            if not future.done():
                future.cancel()

    def _close(self) -> None:
        # The event log is the truth: re-read it so no point flushed at the end is missed.
        try:
            with self._lock:
                self._points = metrics.items_of(
                    self.client.get_events(metrics.metrics_topic(self.id))
                )
            for topic in (metrics.metrics_topic(self.id), metrics.logs_topic(self.id)):
                self.client.unsubscribe_topic(topic)
            self.client.log_event(metrics.RUNS_TOPIC, {"run": self.id, "state": self._status})
        except Exception:
            pass
        if self._payload is not None:
            self._payload.release()
            self._payload = None
        self.finished = time.time()
        from .launch import _forget

        _forget(self)
        self._done.set()

    # ------------------------------------------------------------ public

    @property
    def status(self) -> str:
        """pending, running, cancelling, finished, error or cancelled."""
        return self._status

    def done(self) -> bool:
        """True once every rank has ended (and the workers are free again)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends; False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """Rank 0's result; raises ``TrainingError`` with the failing rank's traceback."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.id} is still {self._status} after {timeout} s.")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self, wait: bool = True) -> None:
        """Stop every rank and free the workers (waits for teardown unless ``wait=False``)."""
        if self._done.is_set():
            return
        self._status = "cancelling"
        if wait:
            self._done.wait()

    @property
    def metrics(self) -> pd.DataFrame:
        """Every reported point: rank, step, epoch, time and the reported values."""
        with self._lock:
            points = list(self._points)
        columns = ["rank", "step", "epoch", "time"]
        frame = pd.DataFrame(points)
        return frame if not frame.empty else pd.DataFrame(columns=columns)

    @property
    def logs(self) -> list[str]:
        """Everything the ranks printed, one ``[rank N] line`` per line, in arrival order."""
        with self._lock:
            return [f"[rank {i['rank']}] {i['line']}" for i in self._lines]

    def __repr__(self) -> str:
        return f"<Run {self.id} {self._status} on {self.world_size} worker(s)>"
