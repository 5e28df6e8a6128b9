"""Unit tests of :mod:`jupyter_mlcloud.telemetry.fold`: run events folded into a listing, and points
turned into a panel's columns. Pure functions: events in, rows and columns out."""

from __future__ import annotations

import re
from typing import Any

import pytest

from jupyter_mlcloud.telemetry import fold
from jupyter_mlcloud.telemetry.fold import (
    fold_run_events,
    metric_columns,
    metric_names,
    steps_per_s,
)


def started(run: str, workers: list[str] | None = None, pid: int = 100) -> dict[str, Any]:
    return {"run": run, "state": "started", "workers": workers or ["w0", "w1"], "pid": pid}


def ended(run: str, state: str = "finished") -> dict[str, Any]:
    return {"run": run, "state": state}


# ---------------------------------------------------------------- folding run events


def test_no_events_no_runs() -> None:
    assert fold_run_events([]) == {}


def test_a_started_run_is_running() -> None:
    folded = fold_run_events([(10.0, started("ab", ["tcp://a", "tcp://b"], pid=42))])
    assert folded == {"ab": {"run": "ab", "status": "running", "started": 10.0, "ended": None,
                             "workers": ["tcp://a", "tcp://b"], "pid": 42}}


@pytest.mark.parametrize("final", ["finished", "error", "cancelled"])
def test_a_run_takes_the_state_of_its_end_event(final: str) -> None:
    folded = fold_run_events([(10.0, started("ab")), (25.5, ended("ab", final))])
    assert folded["ab"]["status"] == final
    assert (folded["ab"]["started"], folded["ab"]["ended"]) == (10.0, 25.5)
    assert folded["ab"]["workers"] == ["w0", "w1"] and folded["ab"]["pid"] == 100


def test_an_end_event_without_a_state_means_ended() -> None:
    folded = fold_run_events([(1.0, started("ab")), (2.0, {"run": "ab"})])
    assert folded["ab"]["status"] == "ended" and folded["ab"]["ended"] == 2.0


def test_a_start_without_workers_or_pid() -> None:
    folded = fold_run_events([(3.0, {"run": "ab", "state": "started"})])
    assert folded["ab"]["workers"] == [] and folded["ab"]["pid"] is None
    assert folded["ab"]["status"] == "running"


def test_runs_are_folded_apart_and_in_order_of_first_event() -> None:
    events = [(1.0, started("aa")), (2.0, started("bb")), (3.0, ended("aa")),
              (4.0, started("cc", pid=7)), (5.0, ended("cc", "error"))]
    folded = fold_run_events(events)
    assert list(folded) == ["aa", "bb", "cc"]
    assert {k: v["status"] for k, v in folded.items()} == {
        "aa": "finished", "bb": "running", "cc": "error"}
    assert {k: (v["started"], v["ended"]) for k, v in folded.items()} == {
        "aa": (1.0, 3.0), "bb": (2.0, None), "cc": (4.0, 5.0)}
    assert folded["cc"]["pid"] == 7


def test_an_end_seen_before_its_start_still_folds_to_the_end_state() -> None:
    folded = fold_run_events([(20.0, ended("ab", "cancelled")), (10.0, started("ab", pid=9))])
    run = folded["ab"]
    assert run["status"] == "cancelled"  # a later-listed start does not bring it back
    assert (run["started"], run["ended"]) == (10.0, 20.0)
    assert run["pid"] == 9 and run["workers"] == ["w0", "w1"]


def test_a_run_known_only_by_its_end() -> None:
    # Its start was not (or no longer) in the log: the end's stamp stands in for the start.
    folded = fold_run_events([(20.0, ended("ab", "error"))])
    assert folded["ab"]["status"] == "error"
    assert folded["ab"]["started"] == folded["ab"]["ended"] == 20.0
    assert "workers" not in folded["ab"] and "pid" not in folded["ab"]


def test_duplicate_events_fold_to_the_same_run() -> None:
    events = [(1.0, started("ab")), (1.0, started("ab")), (5.0, ended("ab")), (5.0, ended("ab"))]
    assert fold_run_events(events) == fold_run_events([(1.0, started("ab")), (5.0, ended("ab"))])


def test_the_last_of_repeated_starts_and_ends_wins() -> None:
    events = [(1.0, started("ab", pid=1)), (2.0, started("ab", pid=2)),
              (5.0, ended("ab", "error")), (6.0, ended("ab", "finished"))]
    run = fold_run_events(events)["ab"]
    assert (run["pid"], run["started"], run["status"], run["ended"]) == (2, 2.0, "finished", 6.0)


TRACKED = {"run_id": "9f1c", "experiment_id": "3", "uri": "sqlite:///mlruns.db"}


@pytest.mark.parametrize("after", [[], [ended("ab")]])
def test_a_tracked_event_adds_the_mlflow_run_and_keeps_the_status(after: list) -> None:
    events = [(1.0, started("ab")), (2.0, {"run": "ab", "state": "tracked", "mlflow": TRACKED})]
    events += [(5.0, event) for event in after]
    run = fold_run_events(events)["ab"]
    assert run["mlflow"] == TRACKED
    assert (run["status"], run["ended"]) == (("finished", 5.0) if after else ("running", None))


def test_a_tracked_event_after_the_end_keeps_the_end_state() -> None:
    events = [(1.0, started("ab")), (5.0, ended("ab", "error")),
              (6.0, {"run": "ab", "state": "tracked", "mlflow": TRACKED}),
              (7.0, {"run": "ab", "state": "tracked", "mlflow": "not a dict"})]
    run = fold_run_events(events)["ab"]
    assert (run["status"], run["ended"], run["mlflow"]) == ("error", 5.0, TRACKED)


def test_a_start_after_the_end_keeps_the_end_state() -> None:
    run = fold_run_events([(1.0, started("ab")), (5.0, ended("ab")), (7.0, started("ab")),
                           ])["ab"]
    assert run["status"] == "finished" and run["ended"] == 5.0 and run["started"] == 7.0


def test_other_messages_on_the_topic_are_ignored() -> None:
    events: list[tuple[float, Any]] = [
        (1.0, "text"), (2.0, None), (3.0, {"state": "started"}), (4.0, ["run", "ab"]),
        (5.0, started("ab")),
    ]
    assert list(fold_run_events(events)) == ["ab"]


def test_folding_does_not_change_the_events() -> None:
    events = [(1.0, started("ab")), (2.0, ended("ab"))]
    copy = [(t, dict(m)) for t, m in events]
    fold_run_events(events)
    assert events == copy


# ---------------------------------------------------------------- panel targets


def test_at_most_sixteen_runs_in_one_panel() -> None:
    ids = [f"{i:x}" for i in range(fold.MAX_OVERLAY)]
    assert fold.parse_run_ids(",".join(ids)) == ids
    with pytest.raises(ValueError, match=re.escape("17 runs in one panel; at most 16")):
        fold.parse_run_ids(",".join([*ids, "ff"]))
    # Repeats count once.
    assert fold.parse_run_ids(",".join(ids + ids)) == ids


def test_run_ids_are_trimmed_and_keep_their_first_order() -> None:
    assert fold.parse_run_ids(" b2 , a1,b2 ") == ["b2", "a1"]


@pytest.mark.parametrize("target", ["", "AB12", "a" * 33, "ab 12", "g1"])
def test_not_a_run_id_names_the_part(target: str) -> None:
    with pytest.raises(ValueError) as caught:
        fold.parse_run_ids(target)
    assert str(caught.value).startswith(f"{target.strip()!r} is not a run id")


# ---------------------------------------------------------------- steps per second


def test_steps_per_s_of_nothing_and_of_one_point() -> None:
    assert steps_per_s([], []) == []
    assert steps_per_s([5.0], [3]) == [None]


def test_steps_per_s_measures_from_the_oldest_point_in_the_window() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    steps = [0, 2, 4, 6, 8, 10]  # 2 steps/s throughout
    assert steps_per_s(times, steps, window=2.0) == [None, 2.0, 2.0, 2.0, 2.0, 2.0]
    # A speed-up shows within the window: the last two seconds ran at 5 steps/s.
    steps = [0, 2, 4, 6, 11, 16]
    rates = steps_per_s(times, steps, window=2.0)
    assert rates[-1] == pytest.approx((16 - 6) / (5.0 - 3.0))
    assert rates[4] == pytest.approx((11 - 4) / (4.0 - 2.0))


def test_steps_per_s_with_no_time_between_points_is_unknown() -> None:
    assert steps_per_s([1.0, 1.0, 2.0], [1, 2, 3]) == [None, None, 2.0]


def test_steps_per_s_needs_as_many_steps_as_times() -> None:
    with pytest.raises(ValueError):
        steps_per_s([0.0, 1.0], [1])


@pytest.mark.xfail(strict=True, reason=(
    "steps_per_s compares each point with the oldest one of its window only: a step that went"
    " back from the point before (a resume), but not below the window's first step, gets a"
    " rate measured across the resume instead of None"))
def test_steps_per_s_is_unknown_where_the_step_went_back_from_the_point_before() -> None:
    times = [0.0, 0.5, 1.0, 1.5]
    steps = [10, 20, 30, 15]  # resumed from a commit at step 15
    assert steps_per_s(times, steps, window=2.0)[3] is None


# ---------------------------------------------------------------- metric columns


def test_metric_names_in_order_of_first_report() -> None:
    points = [{"rank": 0, "step": 1, "epoch": 0, "time": 0.0, "loss": 1.0},
              {"rank": 0, "step": 2, "epoch": 0, "time": 1.0, "acc": 0.5, "loss": 0.9},
              {"rank": 1, "step": 2, "lr": 0.1}]
    assert metric_names(points) == ["loss", "acc", "lr"]
    assert metric_names([]) == []


def test_columns_hold_rank_0_only_with_none_where_a_metric_was_missing() -> None:
    points = [
        {"rank": 0, "step": 1, "epoch": 0, "time": 10.0, "loss": 2.0},
        {"rank": 1, "step": 1, "epoch": 0, "time": 10.0, "loss": 99.0, "other": 1.0},
        {"rank": 0, "step": 2, "epoch": 0, "time": 11.0, "loss": 1.5, "acc": 0.25},
        {"rank": 0, "step": 3, "epoch": 0, "time": 12.0, "acc": 0.5},
    ]
    columns = metric_columns(points)
    assert columns == {"step": [1, 2, 3], "time": [10.0, 11.0, 12.0],
                       "steps_per_s": [None, 1.0, 1.0],
                       "loss": [2.0, 1.5, None], "acc": [None, 0.25, 0.5]}


def test_columns_keep_the_last_history_points() -> None:
    points = [{"rank": r, "step": s, "time": float(s), "loss": s / 10}
              for s in range(20) for r in (0, 1)]
    columns = metric_columns(points, history=5)
    assert columns["step"] == [15, 16, 17, 18, 19]
    assert columns["loss"] == [1.5, 1.6, 1.7, 1.8, 1.9]
    assert columns["steps_per_s"][0] is None  # nothing older kept to measure from


def test_columns_of_no_points() -> None:
    assert metric_columns([]) == {"step": [], "time": [], "steps_per_s": []}
    assert metric_columns([{"rank": 1, "step": 1, "time": 0.0, "x": 1.0}]) == {
        "step": [], "time": [], "steps_per_s": []}
