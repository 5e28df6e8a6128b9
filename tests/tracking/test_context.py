"""The pipeline step a run is started in: set by the runner in this process, read from the
environment in a step's own kernel, and the tags a run started there carries."""

from __future__ import annotations

import pytest

from jupyter_mlcloud.tracking import context


def test_outside_a_step_runs_carry_nothing_and_nothing_is_noted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in context.ENV.values():
        monkeypatch.delenv(variable, raising=False)
    assert context.active() is None and context.run_tags() == {}
    context.started("abc")  # no step: nowhere to note it, and no error


def test_a_step_names_the_runs_started_in_it_and_ends_with_its_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in context.ENV.values():
        monkeypatch.delenv(variable, raising=False)
    step = context.StepContext("nightly", "train", pipeline_run="p1", step_run="s1")
    with context.in_step(step):
        assert context.run_tags() == {
            "mlcloud.pipeline": "nightly", "mlcloud.pipeline.step": "train",
            "mlcloud.pipeline.run": "p1", "mlflow.parentRunId": "s1"}
        context.started("r1")
        inner = context.StepContext("other", "fit")  # unrecorded: no parent to name
        with context.in_step(inner):
            assert context.run_tags() == {"mlcloud.pipeline": "other",
                                          "mlcloud.pipeline.step": "fit"}
        assert context.active() is step
    assert step.started == ["r1"] and inner.started == []
    assert context.active() is None


def test_a_steps_kernel_reads_it_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    step = context.StepContext("nightly", "report", pipeline_run="p1", step_run="s1")
    env = context.step_env(step)
    assert env == {"MLCLOUD_PIPELINE": "nightly", "MLCLOUD_PIPELINE_STEP": "report",
                   "MLCLOUD_PIPELINE_RUN": "p1", "MLCLOUD_PIPELINE_STEP_RUN": "s1"}
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    seen = context.active()
    assert seen == context.StepContext("nightly", "report", "p1", "s1")
    assert context.run_tags()["mlflow.parentRunId"] == "s1"
    context.started("r1")  # another process's step: its runner finds the run by its parent
    assert seen is not None and seen.started == []
