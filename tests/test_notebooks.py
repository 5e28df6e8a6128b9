"""Every tutorial notebook runs top to bottom in a real kernel and shows what it promises."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

from tests.conftest import child_processes, discovery_files, wait_for

ROOT = Path(__file__).parent.parent
FOLDER = ROOT / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("[0-9][0-9]-*.ipynb"))


def _runner() -> ModuleType:
    """notebooks/run.py, the runner `make demo` uses."""
    spec = importlib.util.spec_from_file_location("notebook_runner", FOLDER / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean_and_shows_its_expected_outputs(path: Path) -> None:
    nb = _runner().run(path)  # raises on a cell error or a missing expected output
    cells = _code(nb)
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert all(c.execution_count is not None for c in cells)  # every cell ran
    # What it must show is declared, and results are checked in the notebook itself.
    assert any(c.metadata.get("expect") for c in cells), f"{path.name} declares no output"
    assert any(re.search(r"^\s*assert ", c.source, re.M) for c in cells), \
        f"{path.name} checks no result"
    # It shuts down what it started: no discovery file, no worker or kernel process.
    assert discovery_files() == []
    wait_for(lambda: not child_processes(), timeout=60, what="the kernel and its workers to exit")


def test_a_missing_expected_output_fails_the_run(tmp_path: Path) -> None:
    runner = _runner()
    nb = nbformat.v4.new_notebook()
    shows = nbformat.v4.new_code_cell("print('rank 0 of 2')\n41 + 1")
    shows.metadata["expect"] = [r"^rank 0 of 2$", r"^42$"]
    misses = nbformat.v4.new_code_cell("print('rank 1 of 2')")
    misses.metadata["expect"] = [r"rank 1 of 3"]
    nb.cells = [shows, misses]
    path = tmp_path / "check.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(runner.MissingOutput) as failure:
        runner.run(path)
    message = str(failure.value)
    assert "/rank 1 of 3/" in message and "rank 1 of 2" in message  # what was asked, and shown
    assert "/^42$/" not in message and "/^rank 0 of 2$/" not in message
    assert runner.main([str(path)]) == 1


def test_notebooks_are_committed_without_outputs() -> None:
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        ran = [i for i, c in enumerate(_code(nb)) if c.outputs or c.execution_count is not None]
        assert not ran, f"{path.name}: code cells {ran} carry outputs; strip them before committing"


def test_the_readme_links_every_notebook_and_binder_opens_the_quickstart() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README does not link {path.name}"
    opened = re.findall(r"mybinder\.org/v2/\S+?urlpath=lab/tree/(notebooks/[\w.-]+\.ipynb)",
                        readme)
    assert opened == ["notebooks/01-quickstart.ipynb"] and (ROOT / opened[0]).is_file()
    assert (ROOT / "binder" / "environment.yml").is_file()


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised: 'dask[array]>=1' -> 'dask'."""
    return re.split(r"[\s\[<>=!~;,]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_the_binder_image_has_every_dependency_and_the_notebooks_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "binder" / "environment.yml").read_text().splitlines()
    conda = {_name(line.strip()[2:]) for line in lines if line.strip().startswith("- ")}
    post_build = (ROOT / "binder" / "postBuild").read_text()
    # conda-forge's CPU build of torch; dask-cuda is pip-installed without its GPU stack.
    renamed = {"torch": "pytorch-cpu"}
    missing = [name for name in map(_name, project["dependencies"])
               if renamed.get(name, name) not in conda and name not in post_build]
    assert not missing, f"binder/environment.yml lacks {missing}"
    test_extra = map(_name, project["optional-dependencies"]["test"])
    assert "scikit-learn" in conda and "scikit-learn" in test_extra
    assert "://" not in "\n".join(lines) + post_build  # channels and packages by name only
    assert "pip install --no-deps ." in post_build
