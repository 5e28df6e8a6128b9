"""ipywidgets for notebooks: display only, every action calls the Python API."""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import ipywidgets as w
from dask.utils import format_bytes

from .clusters import ClusterHandle


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
