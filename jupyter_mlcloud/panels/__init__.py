"""Bokeh panels, one function per panel; they hold no state of their own.

Each panel is a Bokeh layout whose ``AjaxDataSource`` polls a JSON URL (served by the Jupyter
server's extension, behind Jupyter's authentication) about once a second, keeping a bounded
history. :func:`page` renders a panel as a standalone HTML page whose BokehJS comes from a
given root URL, so no extra port and no network access are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REFRESH_MS = 1000
HISTORY = 5000  # points kept per series
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _pause_button(source: Any) -> Any:
    """A toggle that stops and restarts the polling."""
    from bokeh.models import CustomJS
    from bokeh.models.widgets import Toggle

    toggle = Toggle(label="Pause", button_type="default", width=90)
    toggle.js_on_change("active", CustomJS(args={"source": source, "toggle": toggle}, code="""
        clearInterval(source.interval);
        if (!toggle.active) { source.setup(); }
        toggle.label = toggle.active ? "Resume" : "Pause";
    """))
    return toggle


def loss_panel(data_url: str, metrics: Sequence[str], *, title: str = "Training") -> Any:
    """Every reported metric of a run against its step (rank 0), with steps/s in the title.

    ``data_url`` answers ``{"step": [...], "<metric>": [...], ...}`` (see
    :func:`jupyter_mlcloud.runs.metric_columns`).
    """
    from bokeh.layouts import column
    from bokeh.models import AjaxDataSource
    from bokeh.models.widgets import Div
    from bokeh.plotting import figure

    names = list(metrics) or ["loss"]
    source = AjaxDataSource(data_url=data_url, polling_interval=REFRESH_MS, mode="replace",
                            method="GET", data={"step": [], **{m: [] for m in names}},
                            name="metrics")
    plot = figure(title=title, height=320, sizing_mode="stretch_width",
                  x_axis_label="step", tools="pan,wheel_zoom,box_zoom,reset,hover")
    for i, name in enumerate(names):
        plot.line("step", name, source=source, legend_label=name,
                  color=PALETTE[i % len(PALETTE)], line_width=2)
    plot.legend.click_policy = "hide"
    header = Div(text=f"<b>{title}</b> · metrics refresh every {REFRESH_MS // 1000} s")
    return column(header, _pause_button(source), plot, sizing_mode="stretch_width")


def resources_panel(data_url: str, *, title: str = "Workers") -> Any:
    """Per-worker CPU % and memory (GiB); GPU utilisation and memory when workers have GPUs.

    ``data_url`` answers ``{"worker": [...], "cpu": [...], "memory_gib": [...],
    "gpu_util": [...], "gpu_memory_gib": [...]}`` (see
    :func:`jupyter_mlcloud.cluster_info.worker_resources`).
    """
    from bokeh.layouts import column, row
    from bokeh.models import AjaxDataSource, FactorRange
    from bokeh.models.widgets import Div
    from bokeh.plotting import figure

    source = AjaxDataSource(data_url=data_url, polling_interval=REFRESH_MS, mode="replace",
                            method="GET", data={"worker": [], "cpu": [], "memory_gib": [],
                                                "gpu_util": [], "gpu_memory_gib": []},
                            name="resources")
    plots = []
    for field, label in [("cpu", "CPU %"), ("memory_gib", "memory (GiB)"),
                         ("gpu_util", "GPU %"), ("gpu_memory_gib", "GPU memory (GiB)")]:
        plot = figure(y_range=FactorRange(), height=220, width=300, title=label,
                      tools="hover", toolbar_location=None)
        plot.hbar(y="worker", right=field, height=0.6, source=source)
        plots.append(plot)
    # GPU plots stay empty (no rows, no error) on workers without GPUs.
    header = Div(text=f"<b>{title}</b> · refresh every {REFRESH_MS // 1000} s")
    return column(header, _pause_button(source), row(*plots[:2]), row(*plots[2:]))


def page(panel: Any, bokeh_root: str, title: str) -> str:
    """A standalone HTML page for ``panel``, loading BokehJS from ``bokeh_root``."""
    from bokeh.embed import file_html
    from bokeh.resources import Resources

    return file_html(panel, resources=Resources(mode="server", root_url=bokeh_root),
                     title=title)
