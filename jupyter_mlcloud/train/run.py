"""``Run``: a training run in flight, as the notebook sees it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..cluster import handover
from ..cluster import info as cluster_info
from ..cost import Budget, Cost, Meter
from ..telemetry import events
from . import checkpoint, registry
from .commits import CommitIndex
from .rank import cancel as rank_cancel
from .rank import ring
from .rank.cancel import cancel_rank
from .rank.worker import RankFailed
from .returned import Returned

if TYPE_CHECKING:
    import pandas as pd

# Errors a rank raises only because another rank failed first.
_CONSEQUENTIAL = ("RunCancelled", "Connection closed by peer", "Connection reset by peer",
                  "Broken pipe", "gloo", "Timed out waiting", "Unable to contact Actor's worker",
                  "Worker holding Actor was lost")
CANCEL_GRACE_S = 30.0  # how long cancelled ranks get to tear down before we stop waiting
STRAGGLER_GRACE_S = 5.0  # how long a rank may run on after a cancelled peer has torn down
DEPARTURE_GRACE_S = 5.0  # how long the scheduler gets to notice a dead worker
PULL_INTERVAL_S = 1.0  # how often new commits are fetched from the ranks
WATCH_INTERVAL_S = 0.25  # how often the watcher looks for a lost worker
REPLACE_TIMEOUT_S = 30.0  # default wait for replacement workers (mlcloud.train.replace-timeout)
PHASES = ("detected", "cancelled", "workers ready", "rejoined", "restored", "first step")

# The run's states and the moves allowed between them (``Run._transition``). A cancel may come
# in any state that is not final and always ends as "cancelled"; a final state is never left.
FINAL = ("finished", "error", "cancelled")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("running", "cancelling", "error"),
    "running": ("recovering", "cancelling", "finished", "error"),
    "recovering": ("running", "cancelling", "error"),
    "cancelling": ("cancelled",),
    "finished": (),
    "error": (),
    "cancelled": (),
}
_log = logging.getLogger(__name__)


def describe_recovery(record: dict[str, Any]) -> str:
    """One line for a recovery record of ``run.events``, with the phases reached so far."""
    phases = record["phases"]
    if record["kind"] == "resume":
        return f"[mlcloud] resumed from checkpoint step {record['from_step']}"
    start = phases["detected"]
    steps = " · ".join(f"{name} +{phases[name] - start:.1f} s" for name in PHASES
                       if name in phases and name != "detected")
    how = "retired: planned move" if record.get("planned") else "lost"
    return (f"[mlcloud] {how} rank(s) {record['lost_ranks']}; recovery {record['attempt']}"
            f" resumes from step {record['from_step']} on {record['world_size']} worker(s):"
            f" {steps}")


def _cancelled() -> TrainingError:
    return TrainingError("the run was cancelled; every rank was stopped.")


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
    """A training run: one task per rank on pinned workers.

    ``result()`` waits and returns rank 0's result; ``cancel()`` stops every rank;
    ``metrics`` is a DataFrame of every ``ctx.report`` point; ``logs`` every line the ranks
    printed; ``events`` one dict per recovery (lost workers, the step it resumed from, the
    time of each phase); ``add_done_callback(fn)`` calls ``fn(run)`` once the run has ended.

    ``status`` moves only along these arrows (``TRANSITIONS``)::

        pending    -> running | cancelling | error
        running    -> recovering | cancelling | finished | error
        recovering -> running | cancelling | error
        cancelling -> cancelled

    pending: created, ranks not started yet; running: ranks training; recovering: a worker
    was lost and the run is restarting from its last commit; cancelling: ``cancel()`` was
    called and the ranks are being stopped. finished, error and cancelled are final: a run
    that reached one never leaves it, and ``cancel()`` is then a no-op. A cancel in any other
    state ends as cancelled, whatever the ranks did meanwhile.

    ``cost`` is what the run has used so far (worker-seconds, GPU-seconds, and a cost with a
    price table; see :mod:`jupyter_mlcloud.cost`). A run given a ``budget`` that reaches it
    goes running -> cancelling -> cancelled as a planned stop: every rank commits one same
    step and stops there (the checkpoint of that step is written if the run has a checkpoint
    directory), and ``stop_reason`` (also the message ``result()`` raises) says that the
    budget was reached and at which step. ``stop_reason`` is None for every other end.
    """

    def __init__(
        self,
        run_id: str,
        client: Any,
        workers: list[str],
        *,
        starter: Any = None,
        store: CommitIndex | None = None,
        checkpoints: checkpoint.CheckpointDir | None = None,
        max_failures: int = 0,
        min_workers: int | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.id = run_id
        self.client = client
        self.workers = workers  # rank r runs on workers[r]
        self.world_size = len(workers)
        self.started = time.time()
        self.finished: float | None = None
        self.events: list[dict[str, Any]] = []
        #: What ``ctx.keep_reference`` kept on rank 0 (a ``Reference``), once finished.
        self.reference: Any = None
        self._futures: list[Any] = []
        self._points: list[dict[str, Any]] = []
        self._lines: list[dict[str, Any]] = []
        self._status = "pending"
        self._error: TrainingError | None = None
        self._result: Any = None
        self._done = threading.Event()
        self._done_callbacks: list[Callable[[Run], None]] = []
        self._listeners: list[Callable[[str, list[dict[str, Any]]], None]] = []
        self._lock = threading.Lock()
        # Held while points or lines are stored and handed to the listeners, so a listener
        # added with replay gets each item exactly once, in order.
        self._feed = threading.RLock()
        self._feed_closed = False  # the final record is read: the subscriptions are stale
        self._starter = starter  # starts an attempt on given workers (see launch.RankStarter)
        self.store, self.checkpoints = store, checkpoints
        self.max_failures, self.min_workers = max_failures, min_workers
        self.attempt = 0
        #: Recoveries from workers lost unexpectedly: those ``max_failures`` counts. A worker
        #: that retired (``retire_workers``, SIGTERM) is a planned move and not counted.
        self.failures = 0
        self._pulled_at = 0.0
        self.tracking: Any = None  # the MLflow record (jupyter_mlcloud.tracking), if tracked
        self.budget = budget
        #: Why the run stopped when it was a planned stop (its budget reached); else None.
        self.stop_reason: str | None = None
        #: True when the run ended in error because workers retired (preempted) and no
        #: replacement came: the cluster's doing, not the training code's or its values'.
        self.preempted = False
        self._retiring: dict[str, float] = {}  # workers about to retire: their grace (s)
        self._meter = Meter()

    # ------------------------------------------------------------ wiring (launcher)

    def subscribe(self) -> None:
        """Start receiving metrics and output; call before any rank starts."""
        self.client.subscribe_topic(events.metrics_topic(self.id), self._on_metrics)
        self.client.subscribe_topic(events.logs_topic(self.id), self._on_logs)
        self.client.subscribe_topic(events.control_topic(self.id), self._on_control)

    def start(self, futures: list[Any], info: dict[str, Any] | None = None) -> None:
        """Watch the rank futures (in a thread) until every rank is done; ``info``: the
        workers' info the launch just read (else read now)."""
        self._futures = futures
        self._open_span(self.workers, info)
        self._transition("running")  # refused if cancelled meanwhile: the watcher stops them
        threading.Thread(target=self._watch, name=f"watch-{self.id}", daemon=True).start()

    def _abandon(self, exc: BaseException) -> None:
        """End a run whose ranks could not be started (the launch failed after creating it)."""
        self._end("error", TrainingError(f"the run could not be started: {exc}"))
        self._close(announce=False)  # it was never announced as started either

    def add_listener(self, listener: Callable[[str, list[dict[str, Any]]], None],
                     replay: bool = False) -> None:
        """``listener(kind, items)`` with kind ``"metrics"`` or ``"logs"``, from any thread.

        With ``replay``, it is first given the points and lines received so far, so a listener
        added after the launch misses nothing and gets nothing twice.
        """
        with self._feed:
            self._listeners.append(listener)
            if replay:
                with self._lock:
                    backlog = [("metrics", list(self._points)), ("logs", list(self._lines))]
                for kind, items in backlog:
                    if items:
                        self._call_listener(listener, kind, items)

    def _on_metrics(self, event: tuple[float, Any]) -> None:
        self._receive("metrics", events.items_of([event]))

    def _on_logs(self, event: tuple[float, Any]) -> None:
        self._receive("logs", events.items_of([event]))

    def _receive(self, kind: str, items: list[dict[str, Any]]) -> None:
        with self._feed:
            if self._feed_closed:  # already in the record read from the scheduler
                return
            with self._lock:
                (self._points if kind == "metrics" else self._lines).extend(items)
            self._notify(kind, items)

    def _on_control(self, event: tuple[float, Any]) -> None:
        for item in events.items_of([event]):
            if item.get("phase") == "example":  # rank 0's first input rows, for the tracker
                self._notify("example", [item])
                continue
            for record in self.events:
                if record["attempt"] == item.get("attempt"):
                    record["phases"].setdefault(item["phase"], item["time"])
                    if item["phase"] == "first step":  # the recovery is complete
                        self._notify("recovery", [record])

    def note_resume(self, snap: checkpoint.Meta) -> None:
        """Record that the first attempt goes on from a checkpoint (``--resume``)."""
        self.events.append({"kind": "resume", "attempt": 0, "lost": [], "from_step": snap.step,
                            "world_size": self.world_size, "phases": {}})

    def _notify(self, kind: str, items: list[dict[str, Any]]) -> None:
        for listener in list(self._listeners):
            self._call_listener(listener, kind, items)

    @staticmethod
    def _call_listener(listener: Callable[[str, list[dict[str, Any]]], None], kind: str,
                       items: list[dict[str, Any]]) -> None:
        try:
            listener(kind, items)
        except Exception:
            pass  # a display problem must never stop the run

    # ------------------------------------------------------------ states

    def _transition(self, to: str, error: TrainingError | None = None,
                    result: Any = None) -> bool:
        """Move to state ``to`` if ``TRANSITIONS`` allows it from the current one (a final one
        with its ``error`` or ``result``); every state change goes through here, under the
        lock. False, and nothing changed, if refused."""
        if to not in TRANSITIONS:
            raise ValueError(f"run state {to!r} is unknown; allowed: {', '.join(TRANSITIONS)}.")
        with self._lock:
            if to not in TRANSITIONS[self._status]:
                return False
            if to in FINAL:  # the outcome is in place before the state says final
                self._error, self._result = error, result
            self._status = to
            return True

    @property
    def _cancel_requested(self) -> bool:
        return self._status == "cancelling"

    def _end(self, status: str, error: TrainingError | None = None, result: Any = None) -> None:
        """Reach the final ``status``; a cancel asked for meanwhile wins over any other end."""
        if self._transition(status, error, result) or status == "cancelled":
            return
        # Refused: either final already (nothing to do) or cancelling, which only this
        # thread (the watcher) leaves, so this second move cannot be raced.
        self._transition("cancelled", _cancelled())

    # ------------------------------------------------------------ watching

    def _missing_workers(self) -> list[str]:
        try:
            alive = cluster_info.addresses(self.client)
        except Exception:
            return []
        return [w for w in self.workers if w not in alive]

    def _watch(self) -> None:
        try:
            while True:
                self._await_attempt()
                if (self._over_budget() and not all(f.done() for f in self._futures)
                        and self._transition("cancelling")):
                    self._stop_for_budget()
                    break
                if self._handing_over() and self._transition("recovering"):
                    outcome, detail, planned, moving = "lost", self._hand_over(), True, True
                else:
                    outcome, detail = self._outcome()
                    planned = outcome == "lost" and self._planned(detail)
                    moving = (outcome == "lost" and (planned or self.failures < self.max_failures)
                              and self._transition("recovering"))
                if moving:
                    if not planned:
                        self.failures += 1
                    try:
                        self._recover(detail, planned)
                        continue
                    except TrainingError as e:
                        self._cancel_ranks()
                        self.preempted = planned
                        self._end("error", e)  # cancelled, if that was asked meanwhile
                        break
                self._conclude(outcome, detail)
                break
        except Exception as e:  # the watcher itself must always end the run
            try:
                self._cancel_ranks()
            except Exception:
                pass
            self._end("error", TrainingError(f"the run's watcher failed: {e}"))
        self._close()

    def _await_attempt(self) -> None:
        """Until a rank fails, a worker goes, the run is cancelled or every rank is done."""
        from distributed import wait

        while True:
            pending = [f for f in self._futures if not f.done()]
            if not pending:
                return
            try:
                wait(pending, timeout=WATCH_INTERVAL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            failed = any(f.status == "error" for f in self._futures)
            if (failed or self._cancel_requested or self._missing_workers()
                    or self._over_budget() or self._handing_over()):
                return
            self._pull()

    def _outcome(self) -> tuple[str, Any]:
        """finished, cancelled, ("error", (rank, exc)) or ("lost", [gone workers])."""
        if self._cancel_requested:
            return "cancelled", None
        if all(f.status == "finished" for f in self._futures):
            return "finished", None
        failed = [(r, f) for r, f in enumerate(self._futures) if f.status == "error"]
        # Prefer the rank whose failure was its own, not a consequence of another's.
        errors = [(r, self._exception(f)) for r, f in failed]
        errors.sort(key=lambda e: _consequential(e[1]))
        gone = self._missing_workers()
        if errors and _consequential(errors[0][1]) and not gone:
            gone = self._wait_for_departure(DEPARTURE_GRACE_S)  # a peer's worker died?
        if errors and not (gone and _consequential(errors[0][1])):
            return "error", errors[0]
        if gone:
            return "lost", gone
        lost = next(r for r, f in enumerate(self._futures) if f.status != "finished")
        text = f"[rank {lost}] its task was cancelled by the scheduler."
        return "error", (lost, RankFailed(lost, self.workers[lost], text))

    def _conclude(self, outcome: str, detail: Any) -> None:
        if outcome == "finished":
            self._pull(final=True)
            returned: Returned = self._futures[0].result()
            self.reference = returned.reference
            self._end("finished", result=returned.value)
            return
        self._cancel_ranks()
        if outcome == "cancelled":
            self._end("cancelled", _cancelled())
        elif outcome == "error":
            rank, exc = detail
            self._end("error", TrainingError(str(exc), rank=rank))
        else:
            rank = self.workers.index(detail[0])
            after = (f" It had already recovered {self.failures} time(s), the most"
                     f" --max-failures {self.max_failures} allows." if self.max_failures else "")
            self._end("error", TrainingError(
                f"[rank {rank}] worker {detail[0]} died during the run; every other rank was"
                f" cancelled.{after}",
                rank=rank,
            ))

    # ------------------------------------------------------------ cost and budget

    def _open_span(self, workers: list[str], info: dict[str, Any] | None = None) -> None:
        """From now on, ``workers`` count towards the run's cost (an attempt started)."""
        if info is None:
            try:
                info = cluster_info.workers(self.client)
            except Exception:
                info = {}
        self._meter.open(self._meter.kinds_of(workers, info))

    def _over_budget(self) -> bool:
        return (self.budget is not None and self.stop_reason is None
                and self._status == "running" and self.budget.reached(self.cost))

    def _stop_for_budget(self) -> None:
        """The budget is reached (the state is "cancelling"): every rank commits one same step
        and stops there, the checkpoint is sealed, and the run ends as cancelled with a
        sentence saying so (``stop_reason``)."""
        assert self.budget is not None
        spent = self.cost
        stop_step = self._stop_at_one_step()
        where = f" at step {stop_step}" if stop_step is not None else ""
        sentence = (f"the run reached its budget of {self.budget.describe()} after"
                    f" {spent.describe()} and stopped on every rank{where}")
        if self.store is not None and self.store.step >= 0:
            sentence += f", with its state committed at step {self.store.step}"
        if self.checkpoints is not None and (latest := self.checkpoints.latest()) is not None:
            sentence += f" and checkpointed in {self.checkpoints.url} (step {latest.step})"
        self.stop_reason = sentence + "."
        self._end("cancelled", TrainingError(self.stop_reason))

    def _stop_at_one_step(self) -> int | None:
        """Every rank commits one same step, one past the most any rank has done, and stops
        there; the commit (and its checkpoint) is pulled. Ranks that never reach a step
        boundary (no ``ctx.shard``) are cancelled. Returns that step (None: no such step)."""
        alive = [w for w in self.workers if w not in set(self._missing_workers())]
        stop_step = None
        try:
            replies = self.client.run(rank_cancel.request_stop, self.id, workers=alive,
                                      on_error="return")
            done = [v for v in replies.values() if isinstance(v, int)]
            if done and max(done) > 0:  # ranks that draw batches from ctx.shard
                stop_step = max(done) + 1
                self.client.run(rank_cancel.set_stop_at, self.id, stop_step, workers=alive,
                                on_error="return")
        except Exception:
            pass
        if stop_step is not None:
            self._wait_quietly(self._futures, CANCEL_GRACE_S, "ALL_COMPLETED")
            self._pull(final=True)  # seals the checkpoint of the stop step
        self._cancel_ranks()  # any rank that has not stopped (no step boundary reached)
        return stop_step

    # ------------------------------------------------------------ workers that retire

    def retiring(self, worker: str, grace: float = handover.GRACE_S) -> None:
        """``worker`` is about to retire (``retire_workers``, SIGTERM, a preemption notice),
        within ``grace`` seconds: the watcher commits one same step on every rank at once, then
        moves the run to a replacement as planned (see :mod:`jupyter_mlcloud.cluster.handover`)."""
        with self._lock:
            if worker in self.workers:
                self._retiring[worker] = grace

    def _handing_over(self) -> bool:
        with self._lock:  # retiring() adds from the client's event loop
            return self._status == "running" and not set(self._retiring).isdisjoint(self.workers)

    def _hand_over(self) -> list[str]:
        """Stop every rank at one committed step, then wait for the retiring workers to go
        (the state is "recovering"); returns them."""
        with self._lock:
            gone = sorted(set(self._retiring) & set(self.workers))
            grace = max(self._retiring[w] for w in gone)
            self._retiring.clear()
        if self.store is not None:
            self._stop_at_one_step()
        else:
            self._cancel_ranks()  # nothing to commit: the next attempt starts over
        deadline = time.monotonic() + DEPARTURE_GRACE_S + grace
        while (time.monotonic() < deadline and not self._cancel_requested
               and set(gone) - set(self._missing_workers())):
            time.sleep(0.1)
        return gone

    @property
    def cost(self) -> Cost:
        """What the run has used so far, live: ``worker_seconds`` and ``gpu_seconds`` (each
        attempt's ranks × its wall time, recoveries included) and ``cost`` (None without a
        price table in the Dask config ``mlcloud.cost.prices``)."""
        return self._meter.cost()

    # ------------------------------------------------------------ commits and recovery

    def _holders(self) -> list[str]:
        """The run's workers and their buddies: every worker that may hold its commits."""
        extra = self._starter.buddies if self._starter is not None else []
        return list(dict.fromkeys([*self.workers, *extra]))

    def _pull(self, final: bool = False) -> None:
        """Learn which commits the workers hold (metadata only); seal complete checkpoints."""
        if self.store is None or not (final or
                                      time.monotonic() - self._pulled_at >= PULL_INTERVAL_S):
            return
        self._pulled_at = time.monotonic()
        alive = set(self._holders()) - set(self._missing_workers())
        try:
            _, ready = self.store.pull(self.client, sorted(alive))
        except Exception:
            return  # a worker went: the watcher sees it next
        sealed, problems = self.store.seal(self.checkpoints, ready)
        for problem in problems:
            self._notify("logs", [{"rank": "mlcloud", "stream": "stderr", "line": problem}])
        if sealed:
            self._notify("checkpoint", [{"step": meta.step} for meta in sealed])

    def _resume_source(self) -> tuple[checkpoint.Meta, ring.Source] | None:
        """Where the next attempt goes on from: the newest commit every rank's part of which a
        live worker holds, else the newest checkpoint in the directory (None: the start)."""
        if self.store is None:
            return None
        best = None
        for _ in range(3):  # a departing worker may still be listed: ask again without it
            try:
                workers = list(cluster_info.workers(self.client))
                best, _ = self.store.pull(self.client, workers, since=-1)
                break
            except Exception as e:
                _log.warning("run %s: asking the workers for commits failed: %s", self.id, e)
                time.sleep(0.2)
        if best is not None:
            return best
        if self.checkpoints is not None:
            meta = self.checkpoints.latest()
            if meta is not None:
                return meta, ring.Source(meta.step, -1, meta.world_size,
                                         directory=self.checkpoints.url)
        return None

    def _planned(self, gone: list[str]) -> bool:
        """Whether every worker in ``gone`` retired (a planned move), none of them lost."""
        from ..cluster.preemption import departed_as_planned

        return bool(gone) and all(departed_as_planned(self.client, w) for w in gone)

    def _recover(self, gone: list[str], planned: bool = False) -> None:
        """Cancel the survivors, wait for workers, start the next attempt from the last commit
        (the state is "recovering" already)."""
        phases = {"detected": time.time()}
        lost_ranks = [self.workers.index(w) for w in gone]
        self._cancel_ranks()
        self._meter.close()  # the lost attempt's span ends; waiting for workers is not counted
        phases["cancelled"] = time.time()
        workers = self._wait_for_workers(gone, planned)
        phases["workers ready"] = time.time()
        resume = self._resume_source()
        self.attempt += 1
        record = {"kind": "recovery", "attempt": self.attempt, "lost": gone, "planned": planned,
                  "lost_ranks": lost_ranks, "from_step": resume[0].step if resume else 0,
                  "world_size": len(workers), "phases": phases}
        self.events.append(record)
        if self.store is not None:
            self.store.reset(len(workers), self.attempt)
        self._open_span(workers)
        try:
            futures = self._starter(workers, resume, self.attempt)
        except Exception as e:
            raise TrainingError(f"the run could not be restarted after losing {gone}: {e}") \
                from None
        phases["rejoined"] = time.time()
        self._release_ranks()
        self.workers, self.world_size, self._futures = workers, len(workers), futures
        self._transition("running")  # refused if cancelled meanwhile: the watcher stops them
        self._notify("recovery", [record])

    def _wait_for_workers(self, gone: list[str], planned: bool = False) -> list[str]:
        """The same number of free workers as before, or at least ``min_workers`` after the
        replace timeout (``planned``: those ``gone`` retired rather than died)."""
        import dask

        need = len(self.workers)
        timeout = float(dask.config.get("mlcloud.train.replace-timeout", REPLACE_TIMEOUT_S))
        deadline = time.monotonic() + timeout
        while True:
            if self._cancel_requested:  # ends as cancelled (see _end)
                raise TrainingError("the run was cancelled while it waited for workers.")
            try:
                free = self._starter.free_workers(self)
            except Exception:
                free = []
            if len(free) >= need:
                return free[:need]
            if time.monotonic() >= deadline:
                if self.min_workers is not None and len(free) >= self.min_workers:
                    return free
                least = f" (at least {self.min_workers} with --min-workers)" \
                    if self.min_workers else ""
                raise TrainingError(
                    f"worker(s) {', '.join(gone)} {'retired' if planned else 'died'} and only"
                    f" {len(free)} free worker(s)"
                    f" were there {timeout:g} s later; the run needs {need}{least}. Scale the"
                    " cluster up and start again (with --resume if it has a --checkpoint-dir)."
                )
            time.sleep(0.1)

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

    def _tell_ranks(self, attempt: int, workers: list[str]) -> None:
        try:
            self.client.run(cancel_rank, self.id, attempt, workers=workers)
        except Exception:  # the watcher's own cancel follows in any case
            pass

    def _cancel_ranks(self) -> None:

        alive = set(self.workers) - set(self._missing_workers())
        running = [(w, f) for w, f in zip(self.workers, self._futures, strict=True)
                   if not f.done()]
        for worker, future in running:
            if worker not in alive:
                future.cancel()  # its worker is gone: nothing to stop, nothing to wait for
        targets = [w for w, _ in running if w in alive]
        if targets:
            try:  # with the attempt, a rank whose task has not started yet stops as it starts
                self.client.run(cancel_rank, self.id, self.attempt, workers=targets)
            except Exception:
                pass
            stopping = [(w, f) for w, f in running if w in alive]
            self._wait_quietly([f for _, f in stopping], CANCEL_GRACE_S, "FIRST_COMPLETED")
            self._wait_quietly([f for _, f in stopping], STRAGGLER_GRACE_S, "ALL_COMPLETED")
            stuck = [w for w, f in stopping if not f.done()]
            if stuck and len(stuck) < len(stopping):
                # A peer has torn down and this rank still runs: it is blocked in a collective
                # the peer left, which no call from its own process releases (gloo). Restarting
                # its worker is what frees it; the nanny brings the worker straight back.
                _log.warning("run %s: rank(s) on %s still blocked %g s after their peers"
                             " stopped; restarting those workers", self.id, ", ".join(stuck),
                             STRAGGLER_GRACE_S)
                try:
                    self.client.restart_workers(stuck, timeout=60, raise_for_error=False)
                except Exception:
                    pass
                self._wait_quietly([f for w, f in stopping if w in stuck], 10, "ALL_COMPLETED")
        for future in self._futures:
            if not future.done():
                future.cancel()

    @staticmethod
    def _wait_quietly(futures: list[Any], timeout: float, return_when: str) -> None:
        from distributed import wait

        if futures:
            try:
                wait(futures, timeout=timeout, return_when=return_when)
            except TimeoutError:
                pass

    def _release_ranks(self) -> None:
        # A held rank future whose result lay on a worker that later dies would make the
        # scheduler run that rank's training again elsewhere.
        for future in self._futures:
            future.release()
        self._futures = []

    def _close(self, announce: bool = True) -> None:
        # The event log is the truth: a rank's last points and lines reach the scheduler
        # before its task ends, but may reach this process's subscription after. So stop
        # listening first, then re-read both from the scheduler. An unsubscribed client still
        # calls the handler for events already on their way: those are dropped (_receive).
        try:
            for topic in (events.metrics_topic(self.id), events.logs_topic(self.id),
                          events.control_topic(self.id)):
                self.client.unsubscribe_topic(topic)
            points = events.items_of(self.client.get_events(events.metrics_topic(self.id)))
            lines = events.items_of(self.client.get_events(events.logs_topic(self.id)))
            with self._feed:
                self._feed_closed = True
                with self._lock:
                    late = {"metrics": points[len(self._points):],
                            "logs": lines[len(self._lines):]}
                    self._points, self._lines = points, lines
                for kind, items in late.items():
                    if items:  # what the subscription had not delivered yet: shown now
                        self._notify(kind, items)
            if announce:  # the runs listing shows the run with this final state
                self.client.log_event(events.RUNS_TOPIC, {"run": self.id,
                                                           "state": self._status})
        except Exception:
            pass
        if self.store is not None:  # the workers drop the run's commits
            try:
                self.client.run(ring.close_ring, self.id, on_error="return")
            except Exception:
                pass
        if self._starter is not None:
            self._starter.release()
        self._release_ranks()
        self._meter.close()
        self.finished = time.time()
        registry.forget(self)
        with self._lock:  # a callback added from now on is called at once, by its adder
            self._done.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            self._call_back(callback)

    def _call_back(self, callback: Callable[[Run], None]) -> None:
        try:
            callback(self)
        except Exception:  # one failing callback must not keep the others from running
            _log.exception("a done callback of run %s failed", self.id)

    # ------------------------------------------------------------ public

    @property
    def committed_step(self) -> int:
        """The newest step whose commit this process holds (0: none yet); a lost worker
        resumes from there."""
        return self.store.step if self.store is not None else 0

    @property
    def mlflow_run_id(self) -> str | None:
        """The id of the MLflow run recording this run; None with ``track=False`` or while the
        tracking store does not answer (waits up to 10 s for the run to be created)."""
        if self.tracking is None:
            return None
        return self.tracking.recorder.created(timeout=10)

    @property
    def status(self) -> str:
        """pending, running, recovering, cancelling, finished, error or cancelled (see the
        class docstring for how it moves)."""
        return self._status

    def done(self) -> bool:
        """True once the run is in a final state, every rank has ended (or was given up on
        after ``CANCEL_GRACE_S``) and the done callbacks are due."""
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[Run], None]) -> None:
        """Call ``fn(run)`` once, when the run is done (from the run's watcher thread), or at
        once (from this thread) if it is done already. An exception in ``fn`` is logged and
        otherwise ignored."""
        if not callable(fn):
            raise ValueError(f"add_done_callback needs a function taking the run, got {fn!r}.")
        with self._lock:
            if not self._done.is_set():
                self._done_callbacks.append(fn)
                return
        self._call_back(fn)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends; False if ``timeout`` passed first."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """Rank 0's result; raises ``TrainingError`` with the failing rank's traceback."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.id} is still {self._status} after {timeout} s"
                               f"{self._whereabouts()}.")
        if self._error is not None:
            raise self._error
        return self._result

    def _whereabouts(self) -> str:
        """Where each rank is, for a run that takes longer than its caller expected: ': rank
        0 has done 12 steps, rank 1 is not running on tcp://...' (empty if no worker answers)."""
        try:
            replies = self.client.run(rank_cancel.progress, self.id, workers=self.workers,
                                      on_error="return", callback_timeout=10)
        except Exception:
            return ""
        where = []
        for rank, worker in enumerate(self.workers):
            reply = replies.get(worker)
            if isinstance(reply, tuple):
                steps, finishing = reply
                where.append(f"rank {rank} has done {steps} step(s)"
                             + (" and is in its teardown" if finishing else ""))
            elif reply is None:
                where.append(f"rank {rank} is not running on {worker}")
            else:
                where.append(f"rank {rank}'s worker {worker} does not answer")
        return ": " + ", ".join(where)

    def cancel(self, wait: bool = True) -> None:
        """Stop every rank and free the workers (waits for teardown unless ``wait=False``).

        From any state that is not final the run goes to cancelling and ends as cancelled; a
        finished, failed or cancelled run stays as it is.
        """
        with self._lock:
            running = self._status == "running"
        # Refused once final: a no-op then.
        if self._transition("cancelling") and running:
            # The ranks hear it now, not at the watcher's next look (up to WATCH_INTERVAL_S):
            # a pruned trial's workers are free that much sooner. The watcher then finds
            # their tasks ended, and stops whatever is left as for any cancel. From a thread,
            # so that cancel(wait=False) never waits on the scheduler.
            threading.Thread(target=self._tell_ranks, args=(self.attempt, list(self.workers)),
                             name=f"mlcloud-cancel-{self.id}", daemon=True).start()
        if wait:
            self._done.wait()

    @property
    def metrics(self) -> pd.DataFrame:
        """Every reported point: rank, step, epoch, time and the reported values."""
        import pandas as pd

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

    def monitor(self, *others: Run) -> Any:
        """A live loss panel of this run (and of ``others``, overlaid) as a notebook widget;
        its ``sources`` map run ids to the Bokeh data sources it streams into."""
        from ..panels.notebook import monitor

        return monitor(self, *others)
