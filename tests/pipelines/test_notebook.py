"""Notebook steps: run in a real kernel with their values injected after the parameters cell,
cached by their code cells, failing with the cell's error and leaving no output behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest

from jupyter_mlcloud.pipelines import pipeline
from jupyter_mlcloud.tracking import store

PARAMETERS = """\
data = "data.json"
scale = 1
model = "model.json"
cluster = None
"""

TRAIN = """\
import json
values = json.load(open(data))
with open(model, "w") as f:
    json.dump({"w": sum(values) * scale}, f)
"""

# Records a run from the kernel as tracking does: it must be filed under the step's MLflow run.
RECORD = """\
from jupyter_mlcloud.tracking import context, store
client = store.client()
experiment = store.experiment_id(client, store.experiment_name())
client.create_run(experiment, run_name="from-notebook", tags=context.run_tags())
"""


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """A notebook of (tag or "", source) code cells, and "md:" sources as markdown."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    for tag, source in cells:
        if source.startswith("md:"):
            notebook.cells.append(nbformat.v4.new_markdown_cell(source[3:]))
            continue
        cell = nbformat.v4.new_code_cell(source)
        if tag:
            cell.metadata["tags"] = [tag]
        notebook.cells.append(cell)
    nbformat.write(notebook, path)
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_a_notebook_step_runs_with_its_values_and_is_cached_by_its_code(
        tmp_path: Path, name: str) -> None:
    book = write_notebook(tmp_path / "train.ipynb", [
        ("", "md:# Train"), ("parameters", PARAMETERS), ("", TRAIN), ("", RECORD)])
    pipe = pipeline(name, root=tmp_path)
    calls: list[str] = []

    @pipe.step(outputs={"data": "work/data.json"})
    def prepare(data: str) -> None:
        calls.append("prepare")
        Path(data).write_text("[1, 2, 3]")

    pipe.step("train.ipynb", inputs=["data"], params={"scale": 2},
              outputs={"model": "work/model.json"})

    @pipe.step(inputs=["model"], outputs=["w"])
    def evaluate(model: str) -> float:
        calls.append("evaluate")
        return float(json.loads(Path(model).read_text())["w"])

    first = pipe.run(cluster="tcp://127.0.0.1:8786")  # a notebook gets the scheduler address
    assert first.ok, first["train"].error
    assert {s: r.state for s, r in first.steps.items()} == dict.fromkeys(first.steps, "done")
    assert first.outputs["w"] == 12.0
    executed = tmp_path / ".mlcloud-pipelines" / name / "train.ipynb"
    assert first.outputs["train.ipynb"] == str(executed)
    assert (tmp_path / "work" / "model.json.mlcloud-done").exists()
    cells = nbformat.read(executed, as_version=4).cells
    assert cells[1].metadata["tags"] == ["parameters"]
    assert cells[2].metadata["tags"] == ["injected-parameters"]
    assert "scale = 2" in cells[2].source and "cluster = 'tcp://127.0.0.1:8786'" in cells[2].source
    assert f"data = {str(tmp_path / 'work' / 'data.json')!r}" in cells[2].source
    assert all(c.execution_count for c in cells if c.cell_type == "code")

    # The run the kernel recorded is a child of the step's run, and the step lists it.
    client = store.client()
    step_run = client.get_run(first["train"].mlflow_run_id)
    assert len(first["train"].runs) == 1
    assert json.loads(step_run.data.tags["mlcloud.step_runs"]) == first["train"].runs
    scored = client.get_run(first["train"].runs[0])
    assert scored.data.tags["mlflow.parentRunId"] == step_run.info.run_id
    assert scored.data.tags["mlcloud.pipeline.step"] == "train"
    assert scored.data.tags["mlcloud.pipeline.run"] == first.mlflow_run_id
    assert scored.info.run_name == "from-notebook"

    # Outputs and metadata of the notebook are not its code: still cached.
    saved = nbformat.read(book, as_version=4)
    saved.cells[2].outputs = [nbformat.v4.new_output("stream", text="42\n")]
    saved.cells[0].source = "# Train, reworded"
    saved.metadata["authors"] = [{"name": "someone"}]
    nbformat.write(saved, book)
    calls.clear()
    again = pipe.run()
    assert {s: r.state for s, r in again.steps.items()} == dict.fromkeys(again.steps, "cached")
    assert calls == [] and again.outputs == first.outputs

    # A changed code cell reruns the notebook, and what reads its changed output.
    saved.cells[2].source = TRAIN.replace("* scale", "* scale + 1")
    del saved.cells[3]  # a removed cell is a change too (and spares importing MLflow again)
    nbformat.write(saved, book)
    changed = pipe.run()
    assert {s: r.state for s, r in changed.steps.items()} == {
        "prepare": "cached", "train": "done", "evaluate": "done"}
    assert changed.outputs["w"] == 13.0 and changed["train"].runs == []


def test_a_failing_cell_fails_the_step_with_its_error_and_writes_nothing(
        tmp_path: Path, name: str) -> None:
    write_notebook(tmp_path / "fit.ipynb", [
        ("parameters", "model = 'model.json'\nlimit = 1"),
        ("", "with open(model, 'w') as f:\n    f.write('half')"),
        ("", "def check(n):\n    raise ValueError(f'loss exploded past {n}')\ncheck(limit)"),
        ("", "print('never')")])
    pipe = pipeline(name, root=tmp_path)
    pipe.step("fit.ipynb", params={"limit": 7}, outputs={"model": "work/model.json"})
    before = files_under(tmp_path)

    result = pipe.run()
    step = result["fit"]
    assert step.state == "failed" and not result.ok
    assert step.reason == ("notebook 'fit.ipynb' failed in cell 3: ValueError: loss exploded"
                           " past 7")
    assert step.error is not None and "check(limit)" in step.error
    assert "\x1b[" not in step.error  # plain text, not terminal colours
    after = files_under(tmp_path) - before
    assert not [f for f in after if f.startswith("work") or f.endswith(".ipynb")], after
    record = store.client().get_run(step.mlflow_run_id)
    assert record.info.status == "FAILED"
    assert "loss exploded past 7" in record.data.tags["mlcloud.error"]
    with pytest.raises(RuntimeError, match="step 'fit' .* failed: notebook 'fit.ipynb'"):
        result.raise_for_failure()


@pytest.mark.parametrize(("notebook", "kwargs", "message"), [
    ("missing.ipynb", {}, "notebook 'missing.ipynb' does not exist under the pipeline's root"),
    ("prepare.py", {}, "a step must be a function or a notebook path ending in .ipynb, got"
                       " 'prepare.py'"),
    ("plain.ipynb", {"params": {"lr": 0.1}}, "notebook 'plain.ipynb' has no cell tagged"
                                             " 'parameters', so its inputs, params and outputs"
                                             " \\['lr'\\] cannot be set"),
    ("tagged.ipynb", {"params": {"lr": 0.1, "momentum": 0.9}},
     "sets \\['momentum'\\], which the parameters cell of 'tagged.ipynb' does not assign; it"
     " assigns \\['epochs', 'lr', 'out'\\]"),
    ("julia.ipynb", {}, "notebook 'julia.ipynb' asks for kernel 'julia-1.11', which is not"
                        " installed; installed: \\[.*'python3'.*\\]"),
    ("tagged.ipynb", {"outputs": ["score"]}, "notebook step 'tagged' declares returned outputs"
                                             " \\['score'\\]; a notebook's outputs are files"),
])
def test_bad_notebook_steps_are_refused_with_one_sentence(
        tmp_path: Path, name: str, notebook: str, kwargs: dict[str, Any], message: str) -> None:
    write_notebook(tmp_path / "plain.ipynb", [("", "x = 1")])
    write_notebook(tmp_path / "tagged.ipynb", [
        ("parameters", "lr = 0.5\nepochs: int = 3\nout = 'model.json'"), ("", "print(lr)")])
    julia = write_notebook(tmp_path / "julia.ipynb", [("", "x = 1")])
    book = nbformat.read(julia, as_version=4)
    book.metadata["kernelspec"]["name"] = "julia-1.11"
    nbformat.write(book, julia)
    before = files_under(tmp_path)
    pipe = pipeline(name, root=tmp_path)
    with pytest.raises(ValueError, match=message):
        pipe.step(notebook, **kwargs)
    assert pipe.steps == {}
    assert files_under(tmp_path) == before
