"""The loss panel inside a notebook: the same Bokeh layout, fed by the kernel's own run.

The kernel already receives every point of its runs (``Run.add_listener``), so the panel needs
no route, poller or port: :class:`LiveLoss` streams rank 0's new points into the sources, and
``jupyter_bokeh`` (an ipywidget) carries each change to the browser. BokehJS itself is loaded
into JupyterLab by this package's extension, from the server's ``/mlcloud/bokeh/static``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..telemetry import fold
from . import BASE_COLUMNS, loss_panel, loss_sources, metric_figure, rates_text


def _number(value: Any) -> float:
    """A reported value as a float for a plot; NaN where a point has none."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


class LiveLoss:
    """A loss panel (see :func:`jupyter_mlcloud.panels.loss_panel`) fed in this process.

    ``add(run_id, points)`` takes reported points in any batches, from any thread, as often as
    they come: each point is shown once (repeats are dropped), only rank 0's, and a metric
    seen for the first time gets its plot. While the panel's Pause button is down, points are
    held and shown when it is released.
    """

    def __init__(self, run_ids: Iterable[str], *, title: str) -> None:
        ids = list(run_ids)
        self.metrics: list[str] = []
        self.sources = loss_sources(ids, [])
        self.layout = loss_panel(self.sources, [], title=title)
        self.lock = threading.RLock()
        self._plots = self.layout.select_one({"name": "plots"})
        self._rates = self.layout.select_one({"name": "rates"})
        self._notice = self.layout.select_one({"name": "notice"})
        self._pause = self.layout.select_one({"name": "pause"})
        self._pause.on_change("active", lambda _attr, _old, new: self._on_pause(bool(new)))
        self._newest: dict[str, tuple[float, float]] = {r: (-math.inf, -math.inf) for r in ids}
        self._tail: dict[str, list[tuple[float, float]]] = {r: [] for r in ids}  # rate window
        self._held: dict[str, list[Mapping[str, Any]]] = {r: [] for r in ids}
        self._lines = {r: f"{r}: no points yet" for r in ids}

    def add(self, run_id: str, points: Iterable[Mapping[str, Any]]) -> None:
        """Show rank 0's points of ``run_id`` that are newer than those shown."""
        with self.lock:
            newest = self._newest[run_id]
            mine = []
            for point in points:
                if point.get("rank") != 0:
                    continue
                key = (_number(point.get("time")), _number(point.get("step")))
                if key > newest:
                    mine.append(point)
                    newest = key
            self._newest[run_id] = newest
            if not mine:
                return
            if self._pause.active:
                self._held[run_id].extend(mine)
                return
            self._stream(run_id, mine)

    def notice(self, text: str) -> None:
        """Show ``text`` above the plots (an empty text hides the notice)."""
        with self.lock:
            self._notice.text = text
            self._notice.visible = bool(text)

    def _on_pause(self, paused: bool) -> None:
        if paused:
            return
        with self.lock:
            for run_id, held in self._held.items():
                self._held[run_id] = []
                if held:
                    self._stream(run_id, held)

    def _stream(self, run_id: str, points: Sequence[Mapping[str, Any]]) -> None:
        for point in points:  # new metrics get plots in the order they first appear
            for name in point:
                if name not in self.metrics and name not in fold.NOT_METRICS + BASE_COLUMNS:
                    self._add_metric(name)
        tail = self._tail[run_id]
        times = [_number(p.get("time")) for p in points]
        steps = [_number(p.get("step")) for p in points]
        rates = fold.steps_per_s([t for t, _ in tail] + times,
                                 [s for _, s in tail] + steps)[len(tail):]
        rows: dict[str, list[Any]] = {
            "step": steps, "time": times,
            "steps_per_s": [math.nan if r is None else r for r in rates],
        }
        for name in self.metrics:
            rows[name] = [_number(p.get(name)) for p in points]
        self.sources[run_id].stream(rows, rollover=fold.HISTORY)
        tail.extend(zip(times, steps, strict=True))
        horizon = tail[-1][0] - fold.RATE_WINDOW_S
        self._tail[run_id] = [p for p in tail if p[0] >= horizon] or tail[-1:]
        self._lines[run_id] = rates_text(run_id, rows)
        self._rates.text = " | ".join(self._lines.values())

    def _add_metric(self, name: str) -> None:
        self.metrics.append(name)
        for source in self.sources.values():
            data = dict(source.data)
            data[name] = [math.nan] * len(data["step"])
            source.data = data
        first = self._plots.children[0] if self._plots.children else None
        plot = metric_figure(name, self.sources, x_range=first.x_range if first else None)
        # Metrics first, in order of appearance; steps/s stays last.
        self._plots.children.insert(len(self.metrics) - 1, plot)


def _records(frame: Any) -> list[dict[str, Any]]:
    """A run's ``metrics`` DataFrame as points (without the metrics a point did not report)."""
    if not len(frame):
        return []
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in frame.to_dict("records")]


def follow(live: LiveLoss, run: Any) -> None:
    """Feed ``live`` with ``run``'s points: those so far, each new batch, and (when the run
    ends) a last reading of its complete record, with its final status as the notice."""

    def on_items(kind: str, items: list[dict[str, Any]]) -> None:
        if kind == "metrics":
            live.add(run.id, items)

    def at_end(done: Any) -> None:
        live.add(done.id, _records(done.metrics))
        if done.status != "finished":
            live.notice(f"run {done.id} {done.status}")

    run.add_listener(on_items, replay=True)
    run.add_done_callback(at_end)


def monitor(*runs_: Any) -> Any:
    """A live loss panel of one run, or several overlaid, as a notebook widget.

    The widget's ``sources`` maps each run id to its Bokeh ``ColumnDataSource``.
    """
    from jupyter_bokeh import BokehModel

    if not runs_:
        raise ValueError("monitor() needs at least one run.")
    ids = [run.id for run in runs_]
    live = LiveLoss(ids, title=f"run {', '.join(ids)}")
    for run in runs_:
        follow(live, run)

    class LossMonitor(BokehModel):  # type: ignore[misc]
        def __repr__(self) -> str:  # a plain shell prints this, not the whole document
            return f"LossMonitor(runs={ids})"

    widget = LossMonitor(live.layout)
    widget.add_class("mlcloud-loss-monitor")
    widget.sources = live.sources
    widget.live = live
    return widget
