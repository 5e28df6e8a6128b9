"""The rank task's own logging: Dask's error for a rank that was told to stop is dropped; every
other failure is logged as Dask logs it."""

from __future__ import annotations

import logging

import pytest

from jupyter_mlcloud.train.rank.worker import RANK_KEY_PREFIX, _quiet_stopped_ranks


def compute_failed(key: str, exception_text: str) -> logging.LogRecord:
    """The record ``distributed.worker`` makes for a task that raised."""
    return logging.LogRecord(
        "distributed.worker", logging.ERROR, __file__, 1,
        "Compute Failed\nKey:       %s\nState:     %s\nTask:  %s\nException: %r\nTraceback: %r\n",
        (key, "executing", "<Task ...>", exception_text, "  File ..."), None)


def test_a_rank_told_to_stop_is_not_logged_as_failed() -> None:
    record = compute_failed(f"{RANK_KEY_PREFIX}ab12-a0-rank-1",
                            "RankFailed(1, 'tcp://127.0.0.1:1', '[rank 1] ... RunCancelled: run"
                            " ab12 was cancelled.')")
    assert _quiet_stopped_ranks(record) is False
    assert "RunCancelled" in record.getMessage()  # the filter matched what Dask prints


@pytest.mark.parametrize(("key", "text"), [
    (f"{RANK_KEY_PREFIX}ab12-a0-rank-0", "RankFailed(0, '...', '[rank 0] ZeroDivisionError')"),
    ("score-ab12-3", "RunCancelled: not a rank's task"),
])
def test_other_failures_are_logged(key: str, text: str) -> None:
    assert _quiet_stopped_ranks(compute_failed(key, text)) is True


def test_other_records_pass() -> None:
    record = logging.LogRecord("distributed.worker", logging.INFO, __file__, 1,
                               "Starting worker %s", ("x",), None)
    assert _quiet_stopped_ranks(record) is True
