"""Loss panels in notebooks (``run.monitor()``) on real runs, and the pure parts they share
with the server's panels."""

from __future__ import annotations

import math

import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.panels.notebook import LiveLoss
from jupyter_mlcloud.telemetry import fold
from tests.conftest import wait_for

CLUSTER = {"name": "panel-tests", "workers": 1}


def _train(ctx, steps=30, compressed=False):
    import time

    for step in range(steps):
        values = {"loss": 1.0 / (step + 1)}
        if compressed and step >= 5:  # a metric that starts later gets its own plot then
            values.update(bytes_sent=1000.0 * step, bytes_ratio=0.5)
        ctx.report(**values)
        time.sleep(0.01)


def test_monitor_streams_a_real_runs_points_into_its_data_source(
        cluster: mlc.ClusterHandle) -> None:
    run = mlc.train(lambda ctx: _train(ctx, compressed=True), cluster=cluster)
    widget = run.monitor()
    source = widget.sources[run.id]
    wait_for(lambda: len(source.data["step"]) == 30, timeout=120, what="30 points in the panel")
    run.result(timeout=120)
    assert source.data["step"] == list(range(1, 31))
    assert source.data["loss"] == pytest.approx([1.0 / s for s in range(1, 31)])
    sent = source.data["bytes_sent"]
    assert all(math.isnan(v) for v in sent[:5]) and sent[5:] == [1000.0 * s for s in range(5, 30)]
    plots = [p.name for p in widget.live.layout.select_one({"name": "plots"}).children]
    assert plots == ["figure-loss", "figure-bytes_sent", "figure-bytes_ratio",
                     "figure-steps_per_s"]  # in the order they were first reported
    rates = [r for r in source.data["steps_per_s"] if not math.isnan(r)]
    assert len(rates) == 29 and all(r > 0 for r in rates)
    assert f"{run.id}: step 30" in widget.live.layout.select_one({"name": "rates"}).text
    assert repr(widget) == f"LossMonitor(runs=['{run.id}'])"


def test_monitor_of_finished_runs_overlays_them(cluster: mlc.ClusterHandle) -> None:
    first = mlc.train(lambda ctx: _train(ctx, steps=5), cluster=cluster)
    first.result(timeout=120)
    second = mlc.train(lambda ctx: _train(ctx, steps=8), cluster=cluster)
    second.result(timeout=120)
    widget = first.monitor(second)
    assert len(widget.sources[first.id].data["step"]) == 5
    assert len(widget.sources[second.id].data["step"]) == 8
    [loss] = widget.live.layout.select({"name": "figure-loss"})
    assert sorted(r.data_source.name for r in loss.renderers) == sorted(
        [f"metrics-{first.id}", f"metrics-{second.id}"])


def test_live_loss_drops_repeats_other_ranks_and_holds_points_while_paused() -> None:
    live = LiveLoss(["ab"], title="t")
    point = {"rank": 0, "step": 1, "time": 10.0, "loss": 0.5}
    live.add("ab", [point, {**point, "rank": 1}])
    live.add("ab", [point])
    assert live.sources["ab"].data["step"] == [1]
    pause = live.layout.select_one({"name": "pause"})
    pause.active = True
    live.add("ab", [{**point, "step": 2, "time": 11.0}])
    assert live.sources["ab"].data["step"] == [1]
    pause.active = False
    assert live.sources["ab"].data["step"] == [1, 2]
    assert live.sources["ab"].data["steps_per_s"][1] == pytest.approx(1.0)


def test_steps_per_s_over_a_window_and_none_where_unmeasurable() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0]
    steps = [0, 10, 20, 30, 40, 5]  # the last one went back: a resume
    assert fold.steps_per_s(times, steps, window=2.0) == [
        None, 10.0, 10.0, 10.0, pytest.approx(10 / 7), None]


@pytest.mark.parametrize(("target", "ids"), [("ab12", ["ab12"]), ("ab12,cd", ["ab12", "cd"]),
                                             ("ab12,ab12", ["ab12"])])
def test_run_ids_of_a_panel_target(target: str, ids: list[str]) -> None:
    assert fold.parse_run_ids(target) == ids


@pytest.mark.parametrize("target", ["ab12,", "xyz", "ab12,../x"])
def test_bad_panel_targets_are_named(target: str) -> None:
    with pytest.raises(ValueError, match="is not a run id"):
        fold.parse_run_ids(target)
