"""What one replica remembers of its traffic, for drift and for delayed labels.

- :class:`Window`: the rows of its recent requests and their outputs, sliding by count (at
  most ``rows`` rows) and by time (none older than ``seconds``); the windows of a version's
  replicas are merged into the version's ``rows`` newest rows (:func:`newest`). A request's
  rows are copied into a ring of ``rows`` rows, so keeping them costs the request path next to
  nothing and a look at the window is one copy, not a join of thousands of small arrays; the
  controller, which looks every ``every_s`` seconds on the worker that serves, asks only for
  the rows written since its last look (:meth:`Window.since`) and keeps the window itself.
  The statistics are computed elsewhere, on demand.
- :class:`Predictions`: each answered request's outputs by request id, for the labels that
  arrive later (:meth:`Predictions.feedback`); joined ones become quality figures over the
  same kind of window: accuracy for classification, RMSE and MAE for regression.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ROWS = 5_000
SECONDS = 3_600.0
PREDICTIONS = 10_000  # about 1.4 KB each: a replica's memory must level off early


@dataclass(frozen=True)
class WindowOptions:
    """How much traffic a replica keeps: ``rows`` rows, none older than ``seconds``; the
    outputs of the last ``predictions`` requests, for delayed labels."""

    rows: int = ROWS
    seconds: float = SECONDS
    predictions: int = PREDICTIONS

    def __post_init__(self) -> None:
        for name in ("rows", "predictions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"monitor {name} must be an integer >= 1, got {value!r}.")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) \
                or self.seconds <= 0:
            raise ValueError(f"monitor seconds must be a number > 0, got {self.seconds!r}.")


class Window:
    """Recent requests' input and output rows (see the module): a ring of ``rows`` rows,
    allocated at the first request with its widths."""

    def __init__(self, options: WindowOptions) -> None:
        self.options = options
        self._times = np.empty(0)
        self._inputs = np.empty((0, 0))
        self._outputs = np.empty((0, 0))
        self._written = 0  # rows written so far (a cursor for since()); never reset
        self._start = 0  # the count when the ring last started over: it holds rows after it
        self._lock = threading.Lock()

    def add(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
        """Keep one request's rows (called on the request path: two small copies)."""
        rows_in, rows_out = _flat(inputs), _flat(outputs)
        now = time.time()
        with self._lock:
            if (not len(self._times) or rows_in.shape[1] != self._inputs.shape[1]
                    or rows_out.shape[1] != self._outputs.shape[1]):
                # The first request, or rows of other widths: the ring starts over with them.
                size = self.options.rows
                self._times = np.zeros(size)
                self._inputs = np.zeros((size, rows_in.shape[1]))
                self._outputs = np.zeros((size, rows_out.shape[1]))
                self._start = self._written
            size = len(self._times)
            n = min(len(rows_in), size)
            rows_in, rows_out = rows_in[len(rows_in) - n:], rows_out[len(rows_out) - n:]
            start = (self._written - self._start) % size
            for at, part in ((start, slice(0, size - start)), (0, slice(size - start, n))):
                count = len(rows_in[part])
                if count:
                    self._times[at:at + count] = now
                    self._inputs[at:at + count] = rows_in[part]
                    self._outputs[at:at + count] = rows_out[part]
            self._written += n

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row in the window now, oldest first: its request's time, its inputs and its
        outputs (1-D, then two 2-D float64 arrays)."""
        oldest = time.time() - self.options.seconds
        times, inputs, outputs, _ = self.since(0)
        recent = times >= oldest
        return times[recent], inputs[recent], outputs[recent]

    def since(self, written: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """The rows written after the first ``written`` that the ring still holds, oldest
        first (as :meth:`snapshot`, but of any age), and how many rows were written so far:
        the cursor for the next call. A watcher that keeps what it saw asks only for the new
        rows, instead of the whole window at each look; rows of other widths than before
        mean the ring started over (the watcher drops what it kept)."""
        with self._lock:
            size = len(self._times)
            first = max(written, self._start, self._written - size)
            slots = (np.arange(first, self._written) - self._start) % max(size, 1)
            return (self._times[slots], self._inputs[slots], self._outputs[slots],
                    self._written)


def newest(times: np.ndarray, inputs: np.ndarray, outputs: np.ndarray, rows: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``rows`` newest rows by time (several replicas' windows merged into one)."""
    if len(times) <= rows and np.all(np.diff(times) >= 0):
        return times, inputs, outputs
    order = np.argsort(times, kind="stable")[-rows:]
    return times[order], inputs[order], outputs[order]


def _flat(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)


class Predictions:
    """Outputs by request id, and the quality of those whose labels came back."""

    def __init__(self, options: WindowOptions) -> None:
        self.options = options
        self._outputs: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        # Joined labels: (time, rows, correct, squared error sum, absolute error sum).
        self._joined: collections.deque[tuple[float, int, int, float, float]] = (
            collections.deque())
        self._kind: str | None = None
        self._lock = threading.Lock()

    def add(self, request_id: str, outputs: np.ndarray) -> None:
        """Remember one answered request's outputs (the oldest are forgotten)."""
        with self._lock:
            self._outputs[request_id] = outputs
            if len(self._outputs) > self.options.predictions:
                self._outputs.popitem(last=False)

    def feedback(self, request_ids: Sequence[str], labels: Sequence[Any]) -> int:
        """Join ``labels`` (one per request: a value, or one per row) to the requests this
        replica answered; the number joined (others were answered elsewhere, or forgotten)."""
        joined = 0
        now = time.time()
        with self._lock:
            for request_id, label in zip(request_ids, labels, strict=True):
                outputs = self._outputs.pop(str(request_id), None)
                if outputs is None:
                    continue
                self._join(now, _flat(outputs), np.asarray(label, dtype=np.float64).ravel())
                joined += 1
            while len(self._joined) > self.options.rows:
                self._joined.popleft()
        return joined

    def _join(self, now: float, outputs: np.ndarray, truth: np.ndarray) -> None:
        if len(truth) != len(outputs):
            raise ValueError(f"a label must give one value per row: the request had"
                             f" {len(outputs)} row(s), its label {len(truth)} value(s).")
        classification = outputs.shape[1] > 1 and bool(np.all(truth == np.round(truth)))
        kind = "classification" if classification else "regression"
        self._kind = self._kind or kind
        if classification:
            correct = int(np.sum(outputs.argmax(1) == truth))
            errors = np.zeros(1)
        else:
            correct = 0
            errors = outputs[:, 0] - truth
        self._joined.append((now, len(truth), correct, float(np.sum(errors ** 2)),
                             float(np.sum(np.abs(errors)))))

    def parts(self) -> dict[str, Any]:
        """Sums over the window (so several replicas add up): ``kind``, ``labelled`` rows,
        ``correct``, ``squared`` and ``absolute`` error sums."""
        oldest = time.time() - self.options.seconds
        with self._lock:
            items = [j for j in self._joined if j[0] >= oldest]
        return {"kind": self._kind, "labelled": sum(j[1] for j in items),
                "correct": sum(j[2] for j in items), "squared": sum(j[3] for j in items),
                "absolute": sum(j[4] for j in items)}


def quality(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several replicas' :meth:`Predictions.parts` as figures: ``labelled`` and, for
    classification, ``accuracy``; for regression, ``rmse`` and ``mae`` (None without labels)."""
    kinds = {p["kind"] for p in parts if p["kind"]}
    n = sum(p["labelled"] for p in parts)
    out: dict[str, Any] = {"kind": kinds.pop() if len(kinds) == 1 else None, "labelled": n,
                           "accuracy": None, "rmse": None, "mae": None}
    if n == 0:
        return out
    if out["kind"] == "classification":
        out["accuracy"] = sum(p["correct"] for p in parts) / n
    elif out["kind"] == "regression":
        out["rmse"] = float(np.sqrt(sum(p["squared"] for p in parts) / n))
        out["mae"] = sum(p["absolute"] for p in parts) / n
    return out
