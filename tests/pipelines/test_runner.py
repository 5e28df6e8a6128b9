"""Running pipelines: caching by content, failure semantics, atomic outputs, the run lock,
and the MLflow records the cache lives in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jupyter_mlcloud.pipelines import PipelineBusy, pipeline
from jupyter_mlcloud.tracking import store


def states(result: Any) -> dict[str, str]:
    return {name: step.state for name, step in result.steps.items()}


ALL_DONE = dict.fromkeys(("prepare", "train", "evaluate", "register"), "done")
ALL_CACHED = dict.fromkeys(ALL_DONE, "cached")


def test_a_rerun_of_an_unchanged_pipeline_is_all_cached(tmp_path: Path, name: str,
                                                        make: Callable[..., Any]) -> None:
    calls: list[str] = []
    pipe = make(tmp_path, name, calls)
    assert [s.name for s in pipe.order()] == ["prepare", "train", "evaluate", "register"]
    first = pipe.run()
    assert first.ok and states(first) == ALL_DONE
    assert calls == ["prepare", "train", "evaluate", "register"]
    assert first.outputs["model"] == str(tmp_path / "work" / "model.json")
    assert json.loads((tmp_path / "work" / "model.json").read_text()) == {"w": 14.0}
    assert first.outputs["score"] == 14.0 and first.outputs["version"] == "models:/digits/14"
    assert (tmp_path / "work" / "model.json.mlcloud-done").exists()

    second = pipe.run()
    assert second.ok and states(second) == ALL_CACHED
    assert calls == ["prepare", "train", "evaluate", "register"]  # nothing called again
    assert second.outputs == first.outputs
    assert second["train"].cached_from == first["train"].mlflow_run_id

    # The records: a parent run per pipeline run, a child per step with its cache key.
    client = store.client()
    parent = client.get_run(second.mlflow_run_id)
    assert parent.data.tags["mlcloud.kind"] == "pipeline"
    assert json.loads(parent.data.tags["mlcloud.steps"]) == ALL_CACHED
    child = client.get_run(first["train"].mlflow_run_id)
    assert child.data.tags["mlflow.parentRunId"] == first.mlflow_run_id
    assert child.data.tags["mlcloud.cache_key"] == first["train"].cache_key
    assert child.data.params["lr"] == "0.5"
    assert "model" in json.loads(child.data.tags["mlcloud.outputs"])
    assert "train" in str(second) and "cached" in str(second)


def test_a_changed_param_reruns_its_step_and_what_reads_changed_outputs(
        tmp_path: Path, name: str, make: Callable[..., Any]) -> None:
    calls: list[str] = []
    pipe = make(tmp_path, name, calls)
    pipe.run()
    calls.clear()
    result = pipe.run(params={"train.lr": 0.25})
    assert states(result) == {"prepare": "cached", "train": "done", "evaluate": "done",
                              "register": "done"}
    assert calls == ["train", "evaluate", "register"]
    assert result.outputs["score"] == 7.0
    calls.clear()
    back = pipe.run(params={"lr": 0.5})  # every step's lr: the first run's outputs again
    assert states(back)["train"] == "done" and states(back)["evaluate"] == "cached"
    with pytest.raises(ValueError, match="'momentum'.*known: \\['prepare.n', 'train.lr'\\]"):
        pipe.run(params={"momentum": 0.9})


def test_changed_code_and_changed_sources_rerun(tmp_path: Path, name: str) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("1 2 3")
    calls: list[str] = []
    pipe = pipeline(name, root=tmp_path)
    pipe.source("raw", "raw.txt")

    @pipe.step(inputs=["raw"], outputs=["total"])
    def add(raw: str) -> int:
        calls.append("add")
        return sum(int(x) for x in Path(raw).read_text().split())

    assert pipe.run().outputs["total"] == 6
    assert states(pipe.run()) == {"add": "cached"}
    raw.write_text("1 2 3 4")
    assert pipe.run().outputs["total"] == 10

    @pipe.step(inputs=["raw"], outputs=["total"])  # replaces the step: new code
    def add(raw: str) -> int:  # noqa: F811
        calls.append("add2")
        return 2 * sum(int(x) for x in Path(raw).read_text().split())

    assert pipe.run().outputs["total"] == 20
    assert calls == ["add", "add", "add2"]


def test_force_reruns_the_named_steps(tmp_path: Path, name: str,
                                      make: Callable[..., Any]) -> None:
    calls: list[str] = []
    pipe = make(tmp_path, name, calls)
    pipe.run()
    calls.clear()
    result = pipe.run(force=["prepare"])
    # prepare wrote the same bytes again: what reads them stays cached.
    assert states(result) == {**ALL_CACHED, "prepare": "done"}
    assert states(pipe.run(force=True)) == ALL_DONE
    with pytest.raises(ValueError, match="'fit'.*its steps: \\['evaluate', 'prepare',"):
        pipe.run(force=["fit"])


def test_a_false_condition_skips_the_step_and_its_dependants(tmp_path: Path, name: str,
                                                             make: Callable[..., Any]) -> None:
    calls: list[str] = []
    pipe = make(tmp_path, name, calls, threshold=100.0)

    @pipe.step(inputs=["version"])
    def announce(version: str) -> None:
        calls.append("announce")

    result = pipe.run()
    assert result.ok
    assert states(result) == {**ALL_DONE, "register": "skipped", "announce": "skipped"}
    assert result["register"].reason == "when= was false"
    assert "register" not in calls and "announce" not in calls


def test_a_failed_step_stops_its_dependants_and_a_rerun_redoes_only_it(
        tmp_path: Path, name: str, make: Callable[..., Any]) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    calls: list[str] = []
    pipe = make(tmp_path, name, calls, fail=fail)
    result = pipe.run()
    assert not result.ok
    assert states(result) == {"prepare": "done", "train": "failed", "evaluate": "not-run",
                              "register": "not-run"}
    assert "the training diverged" in result["train"].reason
    assert "RuntimeError" in (result["train"].error or "")
    with pytest.raises(RuntimeError, match="step 'train'.*failed"):
        result.raise_for_failure()
    # Nothing half-written: no model, no temporary name left beside it.
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "data.json", "data.json.mlcloud-done"]
    parent = store.client().get_run(result.mlflow_run_id)
    assert parent.info.status == "FAILED"

    fail.unlink()
    calls.clear()
    again = pipe.run()
    assert states(again) == {**ALL_DONE, "prepare": "cached"}
    assert calls == ["train", "evaluate", "register"]


def test_outputs_changed_or_removed_since_are_made_again(tmp_path: Path, name: str,
                                                         make: Callable[..., Any]) -> None:
    calls: list[str] = []
    pipe = make(tmp_path, name, calls)
    pipe.run()
    model = tmp_path / "work" / "model.json"
    model.write_text('{"w": 1.0}')  # edited by hand: the marker's digest no longer holds
    calls.clear()
    assert states(pipe.run())["train"] == "done"
    assert json.loads(model.read_text()) == {"w": 14.0}
    (tmp_path / "work" / "data.json").unlink()
    # A temporary name a killed step left behind is cleared when the step runs again.
    stale = tmp_path / "work" / "data.mlcloud-tmp-0123456789ab.json"
    stale.write_text("[0, 1")
    calls.clear()
    result = pipe.run()
    assert states(result)["prepare"] == "done" and states(result)["train"] == "cached"
    assert not stale.exists()


def test_a_second_run_of_the_same_pipeline_is_refused(tmp_path: Path, name: str) -> None:
    pipe = pipeline(name, root=tmp_path)
    refusals: list[str] = []

    @pipe.step
    def nested() -> None:
        try:
            pipe.run()
        except PipelineBusy as e:
            refusals.append(str(e))

    assert pipe.run().ok
    assert len(refusals) == 1
    assert refusals[0].startswith(f"pipeline {name!r} is already running (pid ")
    assert pipe.run().ok  # the lock went with the run


def test_steps_that_break_their_contract_fail_with_a_sentence(tmp_path: Path,
                                                              name: str) -> None:
    pipe = pipeline(name, root=tmp_path)

    @pipe.step(outputs={"table": "out/table.csv"})
    def lazy(table: str) -> None:
        return None  # never writes its output

    @pipe.step(outputs=["model"])
    def heavy() -> object:
        return object()  # not an artifact: a Python object

    result = pipe.run()
    assert "returned without writing its output 'table'" in result["lazy"].reason
    assert "returned output 'model' as object" in result["heavy"].reason
    assert not (tmp_path / "out" / "table.csv").exists()


def test_bad_definitions_are_refused_with_one_sentence(tmp_path: Path, name: str) -> None:
    pipe = pipeline(name, root=tmp_path)
    with pytest.raises(ValueError, match="pipeline name 'a b' is not allowed"):
        pipeline("a b")
    with pytest.raises(ValueError, match="param 'when' of step 'f' is datetime"):
        import datetime

        pipe.step(lambda when: None, name="f", params={"when": datetime.datetime.now()})
    with pytest.raises(ValueError, match="step 'g' takes \\['x'\\], which are none of"):
        pipe.step(lambda x: None, name="g")
    with pytest.raises(ValueError, match="declares \\['y'\\], which its function does not"):
        pipe.step(lambda: None, name="h", params={"y": 1})
    pipe.step(lambda data: None, name="reads", inputs=["data"])
    with pytest.raises(ValueError, match="reads \\['data'\\], which no step makes"):
        pipe.run()
    pipe.step(lambda: 1, name="makes", outputs=["data"])
    with pytest.raises(ValueError, match="output 'data' of step 'again' is already made by"
                                         " 'makes'"):
        pipe.step(lambda: 1, name="again", outputs=["data"])
    pipe.step(lambda data: 1, name="makes", inputs=["data"], outputs=["data"])
    with pytest.raises(ValueError, match="reads its own output"):
        pipe.run()


def test_outputs_at_fsspec_urls_are_published_and_cached(tmp_path: Path, name: str) -> None:
    import fsspec

    url = f"memory://{name}/table.csv"
    pipe = pipeline(name, root=tmp_path)
    calls: list[str] = []

    @pipe.step(outputs={"table": url})
    def write(table: str) -> None:
        calls.append("write")
        assert table != url and table.startswith(f"memory://{name}/table.mlcloud-tmp-")
        with fsspec.open(table, "w") as f:
            f.write("a,b\n1,2\n")

    @pipe.step(inputs=["table"], outputs=["rows"])
    def count(table: str) -> int:
        with fsspec.open(table) as f:
            return len(f.read().splitlines()) - 1

    assert pipe.run().outputs == {"table": url, "rows": 1}
    assert states(pipe.run()) == {"write": "cached", "count": "cached"}
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"/{name}", detail=False)) == [
        "table.csv", "table.csv.mlcloud-done"]
    fs.rm(f"/{name}/table.csv")
    # Remote objects are told apart by what their store says (here the creation time, an
    # ETag on S3), not by reading them: the rewritten table counts as changed.
    assert states(pipe.run()) == {"write": "done", "count": "done"}
    assert calls == ["write", "write"]


KILLED = """
import os, signal
import jupyter_mlcloud as mlc

pipe = mlc.pipeline(os.environ["PIPE_NAME"], root=os.environ["PIPE_ROOT"])

@pipe.step(outputs={"table": "out/table.csv"})
def write(table):
    with open(table, "w") as f:
        f.write("a,b\\n1,")
        f.flush()
        if os.path.exists(os.path.join(os.environ["PIPE_ROOT"], "kill")):
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, as by the OOM killer
        f.write("2\\n")

if __name__ == "__main__":
    pipe.run()
"""


def test_a_step_killed_mid_way_leaves_no_output_and_no_lock(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy
    import subprocess
    import sys

    script = tmp_path / "flow.py"
    script.write_text(KILLED)
    (tmp_path / "kill").touch()
    monkeypatch.setenv("PIPE_NAME", name)
    monkeypatch.setenv("PIPE_ROOT", str(tmp_path))
    killed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(left) == 1 and left[0].startswith("table.mlcloud-tmp-"), left  # no table.csv

    (tmp_path / "kill").unlink()
    pipe = runpy.run_path(str(script), run_name="flow")["pipe"]
    assert states(pipe.run()) == {"write": "done"}  # the dead run's lock went with it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "table.csv", "table.csv.mlcloud-done"]
    assert (tmp_path / "out" / "table.csv").read_text() == "a,b\n1,2\n"


def test_a_study_started_in_a_step_is_a_child_of_the_steps_run(tmp_path: Path,
                                                                name: str) -> None:
    import optuna

    from jupyter_mlcloud.tuning.record import StudyRecord

    pipe = pipeline(name, root=tmp_path)

    @pipe.step(outputs=["study"])
    def tune() -> str:
        study = optuna.create_study(study_name=f"{name}-study")
        parent = StudyRecord(study, {"n_trials": 0})
        parent.end("FINISHED")
        assert parent.run_id is not None
        return parent.run_id

    result = pipe.run()
    step = result["tune"]
    assert result.ok, step.error
    assert step.runs == [result.outputs["study"]]
    client = store.client()
    tags = client.get_run(step.runs[0]).data.tags
    assert tags["mlflow.parentRunId"] == step.mlflow_run_id
    assert (tags["mlcloud.kind"], tags["mlcloud.pipeline.step"]) == ("study", "tune")
    assert tags["mlcloud.pipeline.run"] == result.mlflow_run_id
    assert json.loads(client.get_run(step.mlflow_run_id).data.tags["mlcloud.step_runs"]) \
        == step.runs
    # A cached rerun starts nothing, and lists nothing.
    again = pipe.run()
    assert again["tune"].state == "cached" and again["tune"].runs == []


def test_an_interrupted_step_leaves_its_run_and_the_pipelines_killed(tmp_path: Path,
                                                                     name: str) -> None:
    pipe = pipeline(name, root=tmp_path)

    @pipe.step(outputs={"table": "out/table.csv"})
    def slow(table: str) -> None:
        Path(table).write_text("a,b\n")
        raise KeyboardInterrupt  # Ctrl-C in the kernel, mid-step

    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    client = store.client()
    experiment = store.experiment_id(client, store.experiment_name())
    runs = client.search_runs([experiment], f"tags.`mlcloud.pipeline` = '{name}'")
    assert sorted((r.data.tags["mlcloud.kind"], r.info.status) for r in runs) == [
        ("pipeline", "KILLED"), ("pipeline-step", "KILLED")]
    assert not (tmp_path / "out" / "table.csv").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []
