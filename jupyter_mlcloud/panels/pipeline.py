"""A pipeline run's page: its step graph as SVG, one column per depth (steps in a column read
only from columns to their left), each step coloured by its state, with a table of the steps
below. Plain HTML, no script: a page of a run still going reloads itself."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

#: A step's state -> its fill (states of work not done are pale).
COLOURS = {"done": "#66bb6a", "cached": "#90caf9", "running": "#ffca28", "failed": "#ef5350",
           "skipped": "#e0e0e0", "not-run": "#e0e0e0", "pending": "#f5f5f5"}
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 170, 46, 60, 24, 16
RELOAD_S = 2  # how often the page of a running pipeline reloads


def _duration(seconds: Any) -> str:
    return "" if seconds is None else f"{float(seconds):.1f} s"


def graph_svg(steps: list[Mapping[str, Any]], edges: list[list[str]]) -> str:
    """The step graph: ``steps`` with ``name``, ``state``, ``depth`` and ``duration``;
    ``edges`` as [from, to] step names."""
    where: dict[str, tuple[int, int]] = {}
    rows: dict[int, int] = {}
    for step in steps:
        depth = int(step.get("depth", 0))
        row = rows.get(depth, 0)
        rows[depth] = row + 1
        where[step["name"]] = (MARGIN + depth * (NODE_W + GAP_X),
                               MARGIN + row * (NODE_H + GAP_Y))
    width = MARGIN * 2 + (max(rows, default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    height = MARGIN * 2 + max(rows.values(), default=1) * (NODE_H + GAP_Y) - GAP_Y
    parts = [f"<svg class='mlcloud-pipeline-graph' xmlns='http://www.w3.org/2000/svg'"
             f" width='{width}' height='{height}' font-family='sans-serif' font-size='12'>",
             "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5'"
             " markerWidth='8' markerHeight='8' orient='auto'>"
             "<path d='M0,0 L10,5 L0,10 z' fill='#757575'/></marker></defs>"]
    for source, target in edges:
        if source in where and target in where:
            (x1, y1), (x2, y2) = where[source], where[target]
            parts.append(f"<line class='edge' data-from='{html.escape(source)}'"
                         f" data-to='{html.escape(target)}' x1='{x1 + NODE_W}'"
                         f" y1='{y1 + NODE_H // 2}' x2='{x2}' y2='{y2 + NODE_H // 2}'"
                         " stroke='#757575' marker-end='url(#arrow)'/>")
    for step in steps:
        x, y = where[step["name"]]
        name, state = html.escape(step["name"]), html.escape(step["state"])
        fill = COLOURS.get(step["state"], "#f5f5f5")
        parts.append(
            f"<g class='step' data-step='{name}' data-state='{state}'>"
            f"<title>{name}: {state}</title>"
            f"<rect x='{x}' y='{y}' width='{NODE_W}' height='{NODE_H}' rx='6' fill='{fill}'"
            " stroke='#616161'/>"
            f"<text x='{x + 8}' y='{y + 18}' font-weight='bold'>{name}</text>"
            f"<text x='{x + 8}' y='{y + 36}'>{state} {_duration(step.get('duration'))}</text>"
            "</g>")
    parts.append("</svg>")
    return "".join(parts)


def pipeline_page(run: Mapping[str, Any]) -> str:
    """The page of one pipeline run, as ``pipelines.record.run_graph`` gives it."""
    title = f"Pipeline {run.get('pipeline')}: run {str(run['mlflow_run_id'])[:8]}"
    rows = "".join(
        f"<tr data-step='{html.escape(s['name'])}'><td>{html.escape(s['name'])}</td>"
        f"<td>{html.escape(s['state'])}</td><td>{_duration(s.get('duration'))}</td>"
        f"<td>{html.escape(s.get('error') or '')}</td></tr>" for s in run["steps"])
    reload = (f"<meta http-equiv='refresh' content='{RELOAD_S}'>"
              if run.get("status") == "running" else "")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{reload}"
            f"<title>{html.escape(title)}</title></head>"
            "<body style='font-family: sans-serif; padding: 16px'>"
            f"<h3>{html.escape(title)}</h3>"
            f"<div class='mlcloud-pipeline-status' data-status='{html.escape(run['status'])}'>"
            f"{html.escape(run['status'])} · {_duration(run.get('duration'))}</div>"
            f"{graph_svg(run['steps'], run['edges'])}"
            "<table class='mlcloud-pipeline-steps' style='margin-top: 12px'>"
            "<tr><th align='left'>step</th><th align='left'>state</th>"
            f"<th align='left'>duration</th><th align='left'>error</th></tr>{rows}</table>"
            "</body></html>")
