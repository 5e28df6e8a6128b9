"""Dynamic batching for one replica: requests (each some rows) are gathered into batches of
at most ``max_batch_size`` rows and computed one batch at a time in a thread of their own, so
the event loop keeps accepting requests while the model runs.

The rules:

- a request that reaches an idle replica (nothing computing, nothing queued) is computed at
  once: it never waits for a batch to fill;
- requests that arrive while a batch computes queue up; when the model is free, the oldest
  waits at most ``max_wait_ms`` from its arrival for the batch to fill (Triton's max queue
  delay), usually not at all, since it has already waited through the previous batch; a
  request of more rows than ``max_batch_size`` is computed alone, never split;
- that wait ends early once requests stop coming (none for ``QUIET_GAPS`` times the recent
  mean gap between arrivals): with fewer clients than ``max_batch_size`` rows, the batch
  would never fill, and each would wait the whole ``max_wait_ms`` for nothing;
- the queue is bounded: past ``max_queue`` waiting requests, or when the estimated wait of a
  new request exceeds ``slo_ms``, :class:`Overloaded` is raised with a Retry-After in seconds.

Each answer carries its :class:`Timings` (queue, batch wait, compute, batch size) so latency
can be split the way the metrics report it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Weight of the newest batch in the moving average of compute time (and of the newest gap
#: in that of the gaps between arrivals).
EWMA_ALPHA = 0.2
#: A batch stops waiting to fill once no request came for this many mean gaps.
QUIET_GAPS = 2.0


@dataclass(frozen=True)
class BatchOptions:
    """How a replica batches: rows per batch, the longest wait for a batch to fill, the
    most requests waiting, and the longest estimated wait accepted (``None``: no limit)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    slo_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got"
                             f" {self.max_batch_size!r}.")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {self.max_queue!r}.")
        if not (isinstance(self.max_wait_ms, (int, float)) and self.max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a number >= 0, got {self.max_wait_ms!r}.")
        if self.slo_ms is not None and not (isinstance(self.slo_ms, (int, float))
                                            and self.slo_ms > 0):
            raise ValueError(f"slo_ms must be a number > 0 or None, got {self.slo_ms!r}.")


class Overloaded(Exception):
    """The replica cannot take the request now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher was closed before the request was computed."""


@dataclass(frozen=True)
class Timings:
    """Where one request's time went (seconds), and the batch it was computed in."""

    queue_s: float  # arrival -> the model was free for it
    batch_wait_s: float  # model free -> its batch was dispatched (waiting for the batch to fill)
    compute_s: float  # dispatch -> the batch's outputs were back on the event loop
    batch_size: int  # rows in its batch
    batch_requests: int  # requests in its batch


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, Timings]]
    arrived: float
    idle: bool  # reached an idle replica: never waits for a batch


class Batcher:
    """The batcher of one replica; construct anywhere, :meth:`start` on the event loop that
    serves the requests, :meth:`close` there when done.

    ``compute`` maps a ``(rows, ...)`` array to outputs with as many rows; it runs in one
    thread (``thread_name`` prefix), never on the event loop. ``on_batch`` is told the rows
    of each batch computed.
    """

    def __init__(self, compute: Callable[[np.ndarray], np.ndarray], options: BatchOptions,
                 *, thread_name: str = "mlcloud-batcher",
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.compute = compute
        self.on_batch = on_batch
        self.options = options
        self._thread_name = thread_name
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._busy = False
        self._closed = False
        self._ewma_s: float | None = None  # mean compute time of a batch
        self._gap_s: float | None = None  # mean time between arrivals
        self._last_arrival: float | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._computing: list[_Pending] = []

    # ------------------------------------------------------------------ state

    @property
    def queued(self) -> int:
        """Requests waiting (not yet computing)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a batch is computing."""
        return self._busy

    @property
    def mean_batch_s(self) -> float | None:
        """Moving average of a batch's compute time (``None`` before the first batch)."""
        return self._ewma_s

    def estimated_wait_s(self, extra_rows: int = 0) -> float:
        """How long a request of ``extra_rows`` rows arriving now would wait before its batch
        is computed: batches ahead of it times the mean batch time (0 before any batch)."""
        if self._ewma_s is None:
            return 0.0
        size = self.options.max_batch_size
        ahead = math.ceil((self._queued_rows + extra_rows) / size) - 1 if self._queue else 0
        return (max(ahead, 0) + (1 if self._busy else 0)) * self._ewma_s

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.estimated_wait_s()))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Begin dispatching; call on the serving event loop."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=self._thread_name)
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def close(self) -> None:
        """Stop dispatching; requests still queued fail with :class:`Closed`. A batch
        computing is not waited for (its thread ends when the model returns)."""
        self._closed = True
        pending = [*self._computing, *self._queue]  # before the task's cleanup forgets them
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in pending:
            if not item.future.done():
                item.future.set_exception(Closed("the replica is shutting down."))
        self._queue.clear()
        self._queued_rows = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests

    async def submit(self, rows: np.ndarray) -> tuple[np.ndarray, Timings]:
        """The model's outputs for ``rows`` (computed in some batch), and their timings.

        Raises :class:`Overloaded` when the queue is full or the estimated wait exceeds
        ``slo_ms``; :class:`Closed` when the batcher is closing; whatever ``compute`` raised
        for the batch otherwise.
        """
        if self._closed or self._wakeup is None:
            raise Closed("the replica is not serving.")
        options = self.options
        if len(self._queue) >= options.max_queue:
            raise Overloaded(f"the replica's queue is full ({options.max_queue} requests"
                             " waiting); retry later.", self._retry_after())
        idle = not self._busy and not self._queue
        if options.slo_ms is not None and not idle:
            wait_s = self.estimated_wait_s(len(rows))
            if wait_s * 1000.0 > options.slo_ms:
                raise Overloaded(f"the estimated wait ({wait_s * 1000.0:.0f} ms) exceeds the"
                                 f" replica's slo_ms ({options.slo_ms:g} ms); retry later.",
                                 self._retry_after())
        future: asyncio.Future[tuple[np.ndarray, Timings]] = (
            asyncio.get_running_loop().create_future())
        now = time.perf_counter()
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap_s = gap if self._gap_s is None else (
                EWMA_ALPHA * gap + (1 - EWMA_ALPHA) * self._gap_s)
        self._last_arrival = now
        self._queue.append(_Pending(rows, future, now, idle))
        self._queued_rows += len(rows)
        self._wakeup.set()
        return await future

    def _fill_wait_s(self, deadline: float) -> float:
        """How much longer a batch may wait to fill: to ``deadline``, and no longer than
        ``QUIET_GAPS`` mean gaps after the last arrival."""
        now = time.perf_counter()
        left = deadline - now
        if self._gap_s is not None and self._last_arrival is not None:
            left = min(left, self._last_arrival + QUIET_GAPS * self._gap_s - now)
        return left

    def _take(self) -> list[_Pending]:
        """Requests for the next batch, oldest first: at least one, then up to
        ``max_batch_size`` rows in all."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if batch and rows + len(item.rows) > self.options.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= len(item.rows)
            if item.future.done():  # its client went away while it waited
                continue
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _dispatch(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        max_wait_s = self.options.max_wait_ms / 1000.0
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            free_at = time.perf_counter()
            oldest = self._queue[0]
            if not oldest.idle:
                deadline = oldest.arrived + max_wait_s
                while self._queued_rows < self.options.max_batch_size:
                    left = self._fill_wait_s(deadline)
                    if left <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except asyncio.TimeoutError:
                        pass  # the deadline, or a pause in arrivals: looked at again above
            batch = self._take()
            if not batch:
                continue
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([b.rows for b in batch])
            dispatched = time.perf_counter()
            self._busy = True
            self._computing = batch
            try:
                outputs = await loop.run_in_executor(self._executor, self.compute, rows)
                if len(outputs) != len(rows):
                    raise RuntimeError(f"the model returned {len(outputs)} rows for a batch of"
                                       f" {len(rows)}.")
            except Exception as e:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self._busy = False
                self._computing = []
            done = time.perf_counter()
            took = done - dispatched
            self._ewma_s = took if self._ewma_s is None else (
                EWMA_ALPHA * took + (1 - EWMA_ALPHA) * self._ewma_s)
            if self.on_batch is not None:
                self.on_batch(len(rows))
            start = 0
            for item in batch:
                stop = start + len(item.rows)
                began = max(item.arrived, free_at)
                timings = Timings(began - item.arrived, dispatched - began, took, len(rows),
                                  len(batch))
                if not item.future.done():
                    item.future.set_result((outputs[start:stop], timings))
                start = stop
