"""Bokeh panels, one function per panel; they hold no state of their own.

A panel is a Bokeh layout over ``ColumnDataSource`` s. The same layout is served two ways:

- as a page of the Jupyter server (:func:`live_page`): a small poller in the page fetches each
  source's JSON route (behind Jupyter's authentication) about once a second, and says so in
  a notice when a route answers 503 (scheduler unreachable) or 404 (the run is gone); BokehJS
  comes from a given root URL, so no extra port and no network access are needed;
- in a notebook cell (:mod:`jupyter_mlcloud.panels.notebook`): the kernel streams points into
  the sources, which ``jupyter_bokeh`` keeps in sync with the browser.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

REFRESH_MS = 1000
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
BASE_COLUMNS = ("step", "time", "steps_per_s")  # what every loss source has, besides metrics
RATE = "steps_per_s"
NOTICE_STYLE: dict[str, str | None] = {
    "color": "#8a1f11", "background": "#fdecea", "padding": "4px 8px", "border-radius": "4px",
    "font-weight": "600"}


def loss_sources(run_ids: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
    """One empty source per run, named ``metrics-<run>``, with the given metric columns."""
    from bokeh.models import ColumnDataSource

    columns = [*BASE_COLUMNS, *(m for m in metrics if m not in BASE_COLUMNS)]
    return {run_id: ColumnDataSource(data={c: [] for c in columns}, name=f"metrics-{run_id}")
            for run_id in run_ids}


def metric_figure(metric: str, sources: Mapping[str, Any], *, x_range: Any = None) -> Any:
    """One metric against step, one line per run (several runs: an overlay, legend by run)."""
    from bokeh.plotting import figure

    label = "steps/s" if metric == RATE else metric
    options: dict[str, Any] = {"x_range": x_range} if x_range is not None else {}
    plot = figure(title=label, height=220, sizing_mode="stretch_width", x_axis_label="step",
                  tools="pan,wheel_zoom,box_zoom,reset,hover", name=f"figure-{metric}",
                  **options)
    for i, (run_id, source) in enumerate(sources.items()):
        plot.line("step", metric, source=source, color=PALETTE[i % len(PALETTE)],
                  line_width=2, legend_label=run_id if len(sources) > 1 else label)
    plot.legend.click_policy = "hide"
    plot.legend.location = "top_right"
    return plot


def loss_panel(sources: Mapping[str, Any], metrics: Sequence[str], *, title: str) -> Any:
    """Every reported metric of one or more runs against step, one plot per metric and runs
    overlaid, then steps/s; a line per run with its step and rate; a notice; a pause button.

    ``sources`` maps run ids to sources from :func:`loss_sources`.
    """
    from bokeh.layouts import column, row
    from bokeh.models.widgets import Div

    plots: list[Any] = []
    for metric in [*(m for m in metrics if m not in BASE_COLUMNS), RATE]:
        plots.append(metric_figure(metric, sources,
                                   x_range=plots[0].x_range if plots else None))
    header = Div(text=f"<b>{html.escape(title)}</b> · refresh every {REFRESH_MS // 1000} s",
                 name="header")
    rates = Div(text=" | ".join(f"{run_id}: no points yet" for run_id in sources),
                name="rates")
    notice = Div(text="", visible=False, name="notice", styles=NOTICE_STYLE)
    return column(row(header, _pause_button()), rates, notice,
                  column(*plots, sizing_mode="stretch_width", name="plots"),
                  sizing_mode="stretch_width")


def rates_text(run_id: str, columns: Mapping[str, Sequence[Any]]) -> str:
    """``<run>: step N · R steps/s`` from a run's columns (the panel's per-run line)."""
    steps = columns.get("step") or []
    if not steps:
        return f"{run_id}: no points yet"
    rate = (columns.get(RATE) or [None])[-1]
    step = steps[-1]
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    text = f"{run_id}: step {step}"
    if isinstance(rate, (int, float)) and rate == rate:  # not None, not NaN
        text += f" · {rate:.1f} steps/s"
    return text


def resources_panel(source: Any, *, title: str = "Workers") -> Any:
    """Per-worker CPU % and memory (GiB); GPU utilisation and memory when workers have GPUs.

    ``source`` has the columns of :func:`jupyter_mlcloud.cluster.info.worker_resources`
    (see :func:`resources_source`).
    """
    from bokeh.layouts import column, row
    from bokeh.models import FactorRange
    from bokeh.models.widgets import Div
    from bokeh.plotting import figure

    plots = []
    for field, label in [("cpu", "CPU %"), ("memory_gib", "memory (GiB)"),
                         ("gpu_util", "GPU %"), ("gpu_memory_gib", "GPU memory (GiB)")]:
        plot = figure(y_range=FactorRange(name=f"workers-{field}"), height=220, width=300,
                      title=label, tools="hover", toolbar_location=None)
        plot.hbar(y="worker", right=field, height=0.6, source=source)
        plots.append(plot)
    # GPU plots stay empty (no rows, no error) on workers without GPUs.
    header = Div(text=f"<b>{html.escape(title)}</b> · refresh every {REFRESH_MS // 1000} s",
                 name="header")
    notice = Div(text="", visible=False, name="notice", styles=NOTICE_STYLE)
    return column(row(header, _pause_button()), notice, row(*plots[:2]), row(*plots[2:]))


def resources_source() -> Any:
    """An empty source with the resource panel's columns, named ``resources``."""
    from bokeh.models import ColumnDataSource

    return ColumnDataSource(data={"worker": [], "cpu": [], "memory_gib": [], "gpu_util": [],
                                  "gpu_memory_gib": []}, name="resources")


def _pause_button() -> Any:
    """A toggle that pauses the updates (the poller and the notebook feed both read it)."""
    from bokeh.models import CustomJS
    from bokeh.models.widgets import Toggle

    toggle = Toggle(label="Pause", button_type="default", width=90, name="pause")
    toggle.js_on_change("active", CustomJS(args={"toggle": toggle}, code="""
        toggle.label = toggle.active ? "Resume" : "Pause";
    """))
    return toggle


# The page's poller: fetches every source's route, keeps a notice of what went wrong, and
# reloads the page (at most every 10 s) when a metric it has no plot for appears.
_POLL_JS = """
const state = {busy: false};
const lines = labels.map(label => label + ": no points yet");
const numeric = values => values.map(v => (v === null ? NaN : v));

function reloadOnce() {
  const key = "mlcloud-reload:" + location.pathname;
  const last = Number(sessionStorage.getItem(key) || 0);
  if (Date.now() - last < 10000) { return false; }
  sessionStorage.setItem(key, String(Date.now()));
  location.reload();
  return true;
}

function line(label, data) {
  const n = data.step ? data.step.length : 0;
  if (!n) { return label + ": no points yet"; }
  const rate = data.steps_per_s ? data.steps_per_s[n - 1] : NaN;
  return label + ": step " + data.step[n - 1] +
    (Number.isFinite(rate) ? " · " + rate.toFixed(1) + " steps/s" : "");
}

async function load(i) {
  let response;
  try {
    response = await fetch(urls[i], {credentials: "same-origin", cache: "no-store"});
  } catch (error) {
    return "the Jupyter server is unreachable — retrying";
  }
  if (response.ok) {
    const data = await response.json();
    if (Object.keys(data).some(k => !known.includes(k)) && reloadOnce()) { return null; }
    const columns = Object.values(data);
    const length = columns.length ? columns[0].length : 0;
    for (const k of Object.keys(data)) { data[k] = numeric(data[k]); }
    for (const k of known) { if (!(k in data)) { data[k] = new Array(length).fill(NaN); } }
    sources[i].data = data;
    for (const range of ranges) { range.factors = data.worker || []; }
    if (labels.length) { lines[i] = line(labels[i], data); }
    return null;
  }
  let message = "";
  try { message = (await response.json()).message || ""; } catch (error) { /* not JSON */ }
  if (response.status === 503) {
    return "scheduler unreachable — retrying" + (message ? " (" + message + ")" : "");
  }
  return message || "the server answered " + response.status;
}

async function poll() {
  if (state.busy || pause.active) { return; }
  state.busy = true;
  try {
    const problems = [...new Set(await Promise.all(urls.map((_, i) => load(i))))].filter(p => p);
    notice.text = problems.map(p => p.replace(/&/g, "&amp;").replace(/</g, "&lt;")).join("<br>");
    notice.visible = problems.length > 0;
    if (rates) { rates.text = lines.join(" | "); }
  } finally {
    state.busy = false;
  }
}

poll();
setInterval(poll, interval);
"""


def live_page(panel: Any, urls: Mapping[str, str], bokeh_root: str, title: str, *,
              labels: Mapping[str, str] | None = None) -> str:
    """A standalone HTML page for ``panel`` that refreshes each named source from its URL.

    ``urls`` maps source names to JSON routes; ``labels`` maps the same names to the label of
    the panel's per-run line (loss panels). BokehJS is loaded from ``bokeh_root``.
    """
    from bokeh.document import Document
    from bokeh.events import DocumentReady
    from bokeh.models import CustomJS, FactorRange

    document = Document()
    document.add_root(panel)
    sources: list[Any] = [document.get_model_by_name(name) for name in urls]
    known = sorted({column for source in sources for column in source.data})
    ranges = [m for m in document.models if isinstance(m, FactorRange)]
    names = list(urls)
    document.js_on_event(DocumentReady, CustomJS(args={
        "sources": sources, "urls": list(urls.values()), "known": known, "ranges": ranges,
        "labels": [labels[n] for n in names] if labels else [],
        "notice": document.get_model_by_name("notice"),
        "rates": document.get_model_by_name("rates"),
        "pause": document.get_model_by_name("pause"), "interval": REFRESH_MS,
    }, code=_POLL_JS))
    return _html(document, bokeh_root, title)


def loss_page(run_ids: Sequence[str], metrics: Sequence[str], root: str) -> str:
    """The loss panel page of ``run_ids`` (overlaid), fed from ``<root>/runs/<id>/metrics``;
    ``root`` is the server's ``/mlcloud`` URL (BokehJS comes from ``<root>/bokeh``)."""
    sources = loss_sources(run_ids, metrics)
    panel = loss_panel(sources, metrics, title=f"run {', '.join(run_ids)}")
    urls = {f"metrics-{r}": f"{root}/runs/{r}/metrics" for r in run_ids}
    labels = {f"metrics-{r}": r for r in run_ids}
    return live_page(panel, urls, f"{root}/bokeh/", f"ML Cloud loss: {', '.join(run_ids)}",
                     labels=labels)


def resources_page(cluster: str, root: str) -> str:
    """The resource panel page of ``cluster``, fed from ``<root>/clusters/<name>/resources``."""
    panel = resources_panel(resources_source(), title=f"cluster {cluster}")
    urls = {"resources": f"{root}/clusters/{cluster}/resources"}
    return live_page(panel, urls, f"{root}/bokeh/", f"ML Cloud resources: {cluster}")


def message_page(title: str, message: str) -> str:
    """A plain page that says one thing (a panel for a run or cluster that does not exist)."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title></head><body style='font-family: sans-serif; padding: 16px'>"
            f"<div class='mlcloud-panel-message'>{html.escape(message)}</div></body></html>")


def _html(document: Any, bokeh_root: str, title: str) -> str:
    from bokeh.embed import file_html
    from bokeh.resources import Resources

    resources = Resources(mode="server", root_url=bokeh_root)
    return file_html(document, resources=resources, title=title)


def page(panel: Any, bokeh_root: str, title: str) -> str:
    """A standalone HTML page for ``panel`` (no refresh), loading BokehJS from ``bokeh_root``."""
    from bokeh.document import Document

    document = Document()
    document.add_root(panel)
    return _html(document, bokeh_root, title)


__all__ = ["live_page", "loss_panel", "loss_sources", "message_page", "metric_figure", "page",
           "rates_text", "resources_panel", "resources_source"]
