"""A replica's traffic window and its delayed labels."""

from __future__ import annotations

import time

import numpy as np
import pytest

from jupyter_mlcloud.monitoring.window import Predictions, Window, WindowOptions, quality


def test_the_window_slides_by_count_and_by_time() -> None:
    window = Window(WindowOptions(rows=10, seconds=0.5))
    for i in range(8):
        window.add(np.full((2, 3), i), np.full((2, 1), -i))
    times, inputs, outputs = window.snapshot()
    assert inputs.shape == (10, 3) and outputs.shape == (10, 1) and times.shape == (10,)
    assert inputs[:, 0].tolist() == [3, 3, 4, 4, 5, 5, 6, 6, 7, 7]  # the newest rows
    deadline = time.monotonic() + 5
    while len(window.snapshot()[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert window.snapshot()[1].shape[0] == 0  # older than 0.5 s: gone


def test_the_window_keeps_the_newest_rows_across_its_wrap_in_order() -> None:
    window = Window(WindowOptions(rows=7))
    sent: list[float] = []
    for n in [3, 5, 1, 6, 2]:  # requests of several sizes wrap the ring
        rows = np.arange(len(sent), len(sent) + n, dtype=np.float32).reshape(n, 1)
        sent += rows[:, 0].tolist()
        window.add(rows, -rows)
    times, inputs, outputs = window.snapshot()
    assert inputs[:, 0].tolist() == sent[-7:] and outputs[:, 0].tolist() == [-v for v in sent[-7:]]
    assert np.all(np.diff(times) >= 0)
    window.add(np.arange(20.0).reshape(10, 2), np.zeros((10, 1)))  # wider rows: it starts over
    assert window.snapshot()[1].tolist() == np.arange(20.0).reshape(10, 2)[-7:].tolist()


def test_since_gives_only_the_rows_written_after_a_cursor_even_across_the_wrap() -> None:
    window = Window(WindowOptions(rows=5))
    times, inputs, outputs, cursor = window.since(0)
    assert inputs.shape[0] == 0 and cursor == 0
    window.add(np.array([[0.0], [1.0]]), np.array([[0.0], [-1.0]]))
    times, inputs, outputs, cursor = window.since(0)
    assert inputs[:, 0].tolist() == [0, 1] and outputs[:, 0].tolist() == [0, -1] and cursor == 2
    window.add(np.array([[2.0], [3.0], [4.0]]), np.zeros((3, 1)))
    window.add(np.array([[5.0]]), np.zeros((1, 1)))  # the ring wrapped: slot 0 holds row 5
    times, inputs, _, cursor = window.since(cursor)
    assert inputs[:, 0].tolist() == [2, 3, 4, 5] and cursor == 6 and len(times) == 4
    assert window.since(cursor)[1].shape[0] == 0  # nothing new
    for value in range(6, 14):  # more rows than the ring holds since the last look
        window.add(np.array([[float(value)]]), np.zeros((1, 1)))
    _, inputs, _, cursor = window.since(cursor)
    assert inputs[:, 0].tolist() == [9, 10, 11, 12, 13] and cursor == 14  # the newest five
    assert window.since(0)[1][:, 0].tolist() == window.snapshot()[1][:, 0].tolist()
    window.add(np.array([[1.0, 2.0]]), np.zeros((1, 1)))  # other widths: it starts over
    _, inputs, _, cursor = window.since(12)
    assert inputs.tolist() == [[1.0, 2.0]] and cursor == 15


def test_labels_join_their_requests_into_accuracy() -> None:
    predictions = Predictions(WindowOptions())
    scores = np.eye(3)  # request i predicts class i
    for i in range(3):
        predictions.add(f"r{i}", scores[i:i + 1])
    assert predictions.feedback(["r0", "r1", "r2", "unknown"], [0, 1, 0, 2]) == 3
    figures = quality([predictions.parts()])
    assert figures["kind"] == "classification" and figures["labelled"] == 3
    assert figures["accuracy"] == pytest.approx(2 / 3)
    assert predictions.feedback(["r0"], [0]) == 0  # each request is joined once


def test_regression_labels_give_rmse_and_mae_summed_over_replicas() -> None:
    first, second = Predictions(WindowOptions()), Predictions(WindowOptions())
    first.add("a", np.array([[1.0], [2.0]]))
    second.add("b", np.array([[5.0]]))
    first.feedback(["a"], [[1.0, 4.0]])  # errors 0 and -2
    second.feedback(["b"], [4.0])  # error 1
    figures = quality([first.parts(), second.parts()])
    assert figures["kind"] == "regression" and figures["labelled"] == 3
    assert figures["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert figures["mae"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"a label must give one value per row: the request"
                                         r" had 1 row\(s\), its label 2 value\(s\)\."):
        second.add("c", np.array([[5.0]]))
        second.feedback(["c"], [[1.0, 2.0]])


def test_bad_window_options_are_refused_in_one_sentence() -> None:
    with pytest.raises(ValueError, match="monitor rows must be an integer >= 1, got 0."):
        WindowOptions(rows=0)
    with pytest.raises(ValueError, match="monitor seconds must be a number > 0, got -1."):
        WindowOptions(seconds=-1)
