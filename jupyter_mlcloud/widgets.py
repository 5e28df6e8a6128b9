"""ipywidgets for notebooks: display only, every action calls the Python API."""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import ipywidgets as w
from dask.utils import format_bytes

from .cluster.api import ClusterHandle


def _figures_html(info: dict[str, Any], dashboard: str | None) -> str:
    memory = format_bytes(info["memory"]) if info.get("memory") else "-"
    link = (
        f'<a href="{html.escape(dashboard)}" target="_blank">{html.escape(dashboard)}</a>'
        if dashboard
        else "-"
    )
    cells = [
        ("Workers", info.get("workers", "-")),
        ("Threads", info.get("threads", "-")),
        ("Memory", memory),
        ("GPUs", info.get("gpus", "-")),
    ]
    row = "".join(
        f"<td style='padding:0 12px 0 0'><b>{k}</b><br>{html.escape(str(v))}</td>"
        for k, v in cells
    )
    return f"<table><tr>{row}</tr></table><div>Dashboard: {link}</div>"


def cluster_card(handle: ClusterHandle, *, poll_seconds: float = 1.0) -> w.VBox:
    """A small card: name and kind, live figures, dashboard link and a scale control.

    Scaling refreshes the figures until the cluster reaches the asked size (up to 60 s).
    """
    title = w.HTML(
        f"<b>{html.escape(handle.name)}</b> &middot; {html.escape(handle.kind)} &middot; "
        f"<code>{html.escape(handle.address)}</code>"
    )
    figures = w.HTML()
    message = w.HTML()
    target = w.BoundedIntText(min=0, max=10_000, description="Workers", layout={"width": "160px"})
    button = w.Button(description="Scale", button_style="primary", layout={"width": "80px"})

    def refresh() -> dict[str, Any]:
        info = handle.info()
        figures.value = _figures_html(info, handle.dashboard_link)
        return info

    def follow(n: int) -> None:
        # Runs in a thread: the kernel stays responsive while workers come and go.
        for _ in range(int(60 / poll_seconds)):
            time.sleep(poll_seconds)
            if handle.closed:
                return
            if refresh()["workers"] == n:
                message.value = f"Scaled to {n} worker(s)."
                return
        message.value = f"Asked for {n} worker(s); still waiting after 60 s."

    def on_scale(_: Any) -> None:
        try:
            handle.scale(int(target.value))
        except ValueError as e:
            message.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return
        message.value = f"Scaling to {target.value} worker(s)..."
        threading.Thread(target=follow, args=(int(target.value),), daemon=True).start()

    button.on_click(on_scale)
    info = refresh()
    target.value = info["workers"]
    controls = [target, button] if handle.cluster is not None else []
    card = w.VBox(
        [title, figures, w.HBox(controls), message],
        layout={"border": "1px solid #ccc", "padding": "6px", "width": "fit-content"},
    )
    card.add_class("mlcloud-cluster-card")
    return card


def _loss_panel(run: Any) -> Any:
    """The run's live loss panel widget; None where it cannot be shown (the progress line
    says everything it would)."""
    from .panels.notebook import monitor

    try:
        return monitor(run)
    except Exception:
        return None


class _MonitorBox(w.VBox):  # type: ignore[misc]
    """The monitor's box. Its plain-text form (what a notebook saved without widget state, or
    a terminal, shows; ipywidgets cuts it at 110 characters) names the run and its loss panel,
    not the progress line, whose text grows."""

    run_id = ""

    def __repr__(self) -> str:
        panels = [repr(c) for c in self.children if not isinstance(c, (w.HTML, w.Output))]
        return f"RunMonitor(run={self.run_id!r}{''.join(f', {p}' for p in panels)})"


class RunMonitor:
    """Progress of a training run: step, epoch, last loss, steps/s and status, live, above
    the run's loss panel (every reported metric against step, steps/s).

    Rank output is printed with its ``[rank N]`` prefix by :meth:`follow` (blocking cells) or
    appended to an ``Output`` widget under the progress line (``--noblock``).
    """

    def __init__(self, run: Any) -> None:
        import queue

        self.run = run
        self.label = w.HTML()
        self.output = w.Output()
        self.panel = _loss_panel(run)
        self.widget = _MonitorBox([self.label, *([self.panel] if self.panel else []),
                                   self.output])
        self.widget.run_id = run.id
        self.widget.add_class("mlcloud-run-monitor")
        self._lines: queue.Queue[str] = queue.Queue()
        self._last: dict[str, Any] = {}
        self._first: tuple[float, int] | None = None
        self._rate = 0.0
        run.add_listener(self._on_items, replay=True)  # lines printed before it was made
        self.refresh()

    def _on_items(self, kind: str, items: list[dict[str, Any]]) -> None:
        if kind == "recovery":
            from .train.run import describe_recovery

            for record in items:
                self._lines.put(describe_recovery(record))
            return
        if kind == "logs":
            for item in items:
                self._lines.put(f"[rank {item['rank']}] {item['line']}")
            return
        for point in items:
            if point.get("rank") != 0:
                continue
            self._last = point
            if self._first is None:
                self._first = (point["time"], point["step"])
            elif point["time"] > self._first[0]:
                self._rate = (point["step"] - self._first[1]) / (point["time"] - self._first[0])

    def refresh(self) -> None:
        p = self._last
        parts = [f"<b>run {html.escape(self.run.id)}</b>", html.escape(self.run.status),
                 f"{self.run.world_size} rank(s)"]
        if p:
            parts += [f"step {p['step']}", f"epoch {p.get('epoch')}"]
            if "loss" in p:
                parts.append(f"loss {p['loss']:.4g}")
            if self._rate:
                parts.append(f"{self._rate:.1f} steps/s")
        cost = getattr(self.run, "cost", None)
        if cost is not None:
            parts.append(html.escape(cost.describe()))
        if getattr(self.run, "stop_reason", None):
            parts.append(html.escape(self.run.stop_reason))
        self.label.value = " &middot; ".join(parts)

    def drain(self, to_widget: bool = False) -> None:
        """Show the rank lines received so far."""
        import queue

        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if to_widget:
                self.output.append_stdout(line + "\n")
            else:
                print(line, flush=True)

    def follow(self, interval: float = 0.1, to_widget: bool = False) -> None:
        """Until the run ends: show rank output as it arrives and refresh the progress line."""
        while not self.run.wait(interval):
            self.drain(to_widget)
            self.refresh()
        self.drain(to_widget)
        self.refresh()

    def follow_in_background(self, interval: float = 0.25) -> None:
        """``follow`` for ``--noblock``: from a thread, output into the widget."""
        threading.Thread(target=self.follow, args=(interval, True), daemon=True,
                         name=f"monitor-{self.run.id}").start()
