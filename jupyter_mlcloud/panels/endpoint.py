"""The endpoint panel: an endpoint's requests per second, p50/p99 latency and errors over time,
in total and per version, and a watched endpoint's drift per feature (each feature's effect,
and how many drifted) and quality from delayed labels.

Its one source has a ``time`` column (epoch milliseconds), the total figures
(:data:`ENDPOINT_FIGURES`), the same per version, named by :func:`version_column`, and the
drift effect per feature, named by :func:`feature_column`. The server samples the endpoint's
router and answers these columns (``GET /mlcloud/endpoints/<cluster>/<name>/stats``); a
version or feature that appears later adds columns, and the page reloads to plot it (see
:func:`jupyter_mlcloud.panels.live_page`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import NOTICE_STYLE, PALETTE, REFRESH_MS, _pause_button, live_page

#: The figures of an endpoint (and of each version) the panel and the sidebar show.
ENDPOINT_FIGURES = ("requests", "errors", "rps", "p50_ms", "p99_ms")
#: A watched endpoint at the controller's last check: how many features drifted, the
#: largest effect (in reference standard deviations), and the main version's quality from
#: delayed labels (accuracy, or RMSE); None for an unwatched one.
DRIFT_FIGURES = ("drifted_features", "largest_effect", "accuracy", "rmse")
SOURCE = "endpoint-stats"
_VERSION_COLUMN = re.compile(r"^v(?P<version>.+)_requests$")
_FEATURE_COLUMN = re.compile(r"^effect:(?P<feature>.+)$")


def version_column(version: Any, figure: str) -> str:
    """The column of one version's figure, e.g. ``v2_rps``."""
    return f"v{version}_{figure}"


def feature_column(feature: Any) -> str:
    """The column of one feature's drift effect (in reference standard deviations), e.g.
    ``effect:age``."""
    return f"effect:{feature}"


def endpoint_columns(versions: Iterable[Any], features: Iterable[Any] = ()) -> list[str]:
    """Every column of an endpoint's source, for these versions and drift features."""
    return ["time", *ENDPOINT_FIGURES, *DRIFT_FIGURES,
            *(version_column(v, f) for v in versions for f in ENDPOINT_FIGURES),
            *(feature_column(f) for f in features)]


def endpoint_versions(columns: Mapping[str, Any]) -> list[str]:
    """The versions that ``columns`` hold figures of, in column order."""
    return [m["version"] for c in columns if (m := _VERSION_COLUMN.match(c))]


def endpoint_features(columns: Mapping[str, Any]) -> list[str]:
    """The features that ``columns`` hold drift effects of, in column order."""
    return [m["feature"] for c in columns if (m := _FEATURE_COLUMN.match(c))]


def endpoint_source(versions: Sequence[Any], features: Sequence[Any] = ()) -> Any:
    """An empty source with the columns of :func:`endpoint_columns`, named ``endpoint-stats``."""
    from bokeh.models import ColumnDataSource

    return ColumnDataSource(data={c: [] for c in endpoint_columns(versions, features)},
                            name=SOURCE)


def endpoint_panel(source: Any, versions: Sequence[Any], *, title: str,
                   details: str = "", features: Sequence[Any] = ()) -> Any:
    """Requests per second (all, and per version), p50 (solid) and p99 (dashed) latency per
    version, errors (all, and per version), each ``features``' drift effect and the count of
    drifted features, and quality, against time; a header, a notice, a pause button.
    ``details``: a line under the header (the URL, the versions' weights)."""
    from bokeh.layouts import column, row
    from bokeh.models.widgets import Div
    from bokeh.plotting import figure

    def plot(name: str, label: str, x_range: Any = None) -> Any:
        options: dict[str, Any] = {"x_range": x_range} if x_range is not None else {}
        return figure(title=label, height=220, sizing_mode="stretch_width",
                      x_axis_type="datetime", tools="pan,wheel_zoom,box_zoom,reset,hover",
                      name=f"figure-{name}", **options)

    rps = plot("rps", "requests/s")
    latency = plot("latency", "latency (ms): p50 solid, p99 dashed", rps.x_range)
    errors = plot("errors", "errors (total)", rps.x_range)
    drift = plot("drift", "drift: effect per feature (reference SDs), features drifted (dashed)",
                 rps.x_range)
    drift.line("time", "drifted_features", source=source, color="#333333", line_width=2,
               line_dash="dashed", legend_label="drifted features")
    for i, feature in enumerate(features):
        drift.line("time", feature_column(feature), source=source,
                   color=PALETTE[i % len(PALETTE)], line_width=2, legend_label=str(feature))
    quality = plot("quality", "quality from delayed labels: accuracy (solid), RMSE (dashed)",
                   rps.x_range)
    quality.line("time", "accuracy", source=source, color="#060", line_width=2,
                 legend_label="accuracy")
    quality.line("time", "rmse", source=source, color="#060", line_width=2,
                 line_dash="dashed", legend_label="rmse")
    for figure_, field in ((rps, "rps"), (errors, "errors")):
        figure_.line("time", field, source=source, color="#333333", line_width=2,
                     legend_label="all")
    if not versions:  # nothing per version yet: the totals
        latency.line("time", "p50_ms", source=source, color="#333333", line_width=2,
                     legend_label="p50")
        latency.line("time", "p99_ms", source=source, color="#333333", line_width=2,
                     line_dash="dashed", legend_label="p99")
    for i, version in enumerate(versions):
        color = PALETTE[i % len(PALETTE)]
        label = f"v{version}"
        rps.line("time", version_column(version, "rps"), source=source, color=color,
                 line_width=2, legend_label=label)
        latency.line("time", version_column(version, "p50_ms"), source=source, color=color,
                     line_width=2, legend_label=f"{label} p50")
        latency.line("time", version_column(version, "p99_ms"), source=source, color=color,
                     line_width=2, line_dash="dashed", legend_label=f"{label} p99")
        errors.line("time", version_column(version, "errors"), source=source, color=color,
                    line_width=2, legend_label=label)
    for figure_ in (rps, latency, errors, drift, quality):
        figure_.legend.click_policy = "hide"
        figure_.legend.location = "top_left"
    header = Div(text=f"<b>{html.escape(title)}</b> · refresh every {REFRESH_MS // 1000} s",
                 name="header")
    about = Div(text=html.escape(details), name="details")
    notice = Div(text="", visible=False, name="notice", styles=NOTICE_STYLE)
    return column(row(header, _pause_button()), about, notice,
                  column(rps, latency, errors, drift, quality, sizing_mode="stretch_width",
                         name="plots"),
                  sizing_mode="stretch_width")


def endpoint_page(cluster: str, name: str, versions: Sequence[Any], root: str, *,
                  details: str = "", features: Sequence[Any] = ()) -> str:
    """The endpoint panel page of endpoint ``name`` on ``cluster``, fed from
    ``<root>/endpoints/<cluster>/<name>/stats``; ``root`` is the server's ``/mlcloud`` URL."""
    from urllib.parse import quote

    panel = endpoint_panel(endpoint_source(versions, features), versions,
                           title=f"endpoint {name} on {cluster}", details=details,
                           features=features)
    url = f"{root}/endpoints/{quote(cluster, safe='')}/{quote(name, safe='')}/stats"
    return live_page(panel, {SOURCE: url}, f"{root}/bokeh/",
                     f"ML Cloud endpoint: {cluster}:{name}")
