"""Commit copies on a rank: small tensors at once, large ones on a background thread, and a
copy whose source changed meanwhile reported as torn."""

from __future__ import annotations

from typing import Any

import torch

from jupyter_mlcloud.train.rank.state import DEFER_MIN_BYTES, clone, clone_deferred

BIG = DEFER_MIN_BYTES // 4 + 1  # float32 elements: just over the threshold


def _state() -> dict[str, Any]:
    return {"models": [{"weight": torch.randn(BIG), "running_mean": torch.randn(4)}],
            "optimizers": [{"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1}]}


def test_large_tensors_are_copied_later_and_small_ones_at_once() -> None:
    state = _state()
    out, deferred = clone_deferred(state)
    assert deferred is not None and deferred.nbytes == BIG * 4
    model = out["models"][0]
    assert model["running_mean"] is not state["models"][0]["running_mean"]
    assert torch.equal(model["running_mean"], state["models"][0]["running_mean"])
    deferred.start()
    assert deferred.intact()
    assert torch.equal(model["weight"], state["models"][0]["weight"])
    assert model["weight"].data_ptr() != state["models"][0]["weight"].data_ptr()
    assert out["optimizers"][0]["lr"] == 0.1


def test_a_source_changed_in_place_makes_the_copy_torn() -> None:
    state = _state()
    out, deferred = clone_deferred(state)
    assert deferred is not None
    deferred.start()
    state["models"][0]["weight"].add_(1.0)
    assert not deferred.intact()


def test_a_changed_small_tensor_does_not_matter_it_was_copied_already() -> None:
    state = _state()
    before = state["models"][0]["running_mean"].clone()
    out, deferred = clone_deferred(state)
    assert deferred is not None
    deferred.start()
    state["models"][0]["running_mean"].add_(1.0)
    assert deferred.intact()
    assert torch.equal(out["models"][0]["running_mean"], before)


def test_reused_buffers_take_the_new_values() -> None:
    state = _state()
    first = clone(state)
    state["models"][0]["weight"].mul_(2.0)
    out, deferred = clone_deferred(state, into=first)
    assert out["models"][0]["weight"] is first["models"][0]["weight"]
    assert deferred is not None
    deferred.start()
    assert deferred.intact()
    assert torch.equal(out["models"][0]["weight"], state["models"][0]["weight"])


def test_clone_copies_everything_at_once() -> None:
    state = _state()
    out = clone(state)
    state["models"][0]["weight"].add_(1.0)
    assert not torch.equal(out["models"][0]["weight"], state["models"][0]["weight"])
