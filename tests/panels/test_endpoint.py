"""The endpoint panel's columns and figures, built with real Bokeh models."""

from __future__ import annotations

from jupyter_mlcloud.panels.endpoint import (
    endpoint_columns,
    endpoint_features,
    endpoint_panel,
    endpoint_source,
    endpoint_versions,
    feature_column,
)


def test_versions_and_drift_features_are_read_back_from_the_columns() -> None:
    columns = dict.fromkeys(endpoint_columns(["1", "2"], ["age", "v2_rps"]))
    assert endpoint_versions(columns) == ["1", "2"]
    # A feature whose name looks like a version's figure stays a feature.
    assert endpoint_features(columns) == ["age", "v2_rps"]
    assert feature_column("age") in columns and "drifted_features" in columns


def test_the_drift_figure_has_a_line_per_feature_and_one_for_the_count() -> None:
    features = ["age", "income", "clicks"]
    source = endpoint_source(["1"], features)
    panel = endpoint_panel(source, ["1"], title="t", features=features)
    [drift] = panel.select({"name": "figure-drift"})
    plotted = {r.glyph.y for r in drift.renderers}
    assert plotted == {"drifted_features", *(feature_column(f) for f in features)}
    assert set(plotted) <= set(source.data)
