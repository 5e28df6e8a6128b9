"""jupyter-mlcloud pipeline run: the real command in a subprocess, its exit codes and table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_mlcloud import cli

CLI = [sys.executable, "-m", "jupyter_mlcloud.cli", "pipeline", "run"]

PIPELINES = """
import json, os
from pathlib import Path
import jupyter_mlcloud as mlc

pipe = mlc.pipeline(os.environ["PIPELINE_NAME"])

@pipe.step(outputs={"data": "data.json"})
def prepare(data):
    Path(data).write_text(json.dumps([1, 2, 3]))

@pipe.step(inputs=["data"], params={"scale": 1}, outputs=["total"])
def total(data, scale):
    if os.path.exists("broken"):
        raise ValueError("bad rows")
    return scale * sum(json.loads(Path(data).read_text()))

other = mlc.pipeline("other")
"""


def rows(table: str) -> dict[str, str]:
    """Step -> state, from the printed table."""
    return {line.split()[0]: line.split()[1] for line in table.splitlines()[1:-1]}


def test_pipeline_run_exits_by_outcome(tmp_path: Path, name: str,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flow.py").write_text(PIPELINES)
    (tmp_path / "broken").touch()
    env = {**os.environ, "PIPELINE_NAME": name}
    failed = subprocess.run(CLI + [f"flow.py:{name}", "--param", "scale=2"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == cli.EXIT_FAILED, failed.stderr
    assert failed.stdout.splitlines()[0].split() == ["step", "state", "seconds", "outputs",
                                                     "note"]
    assert rows(failed.stdout) == {"prepare": "done", "total": "failed"}
    assert f"pipeline '{name}' FAILED" in failed.stdout
    assert "ValueError: bad rows" in failed.stderr

    # The same command in this process (it has MLflow loaded already): fixed, it exits 0.
    (tmp_path / "broken").unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_NAME", name)
    assert cli.main(["pipeline", "run", f"flow.py:{name}", "--param", "scale=2"]) == 0
    assert rows(capsys.readouterr().out) == {"prepare": "cached", "total": "done"}
    assert cli.main(["pipeline", "run", "flow.py"]) == cli.EXIT_USAGE
    assert "defines several pipelines, ['other'," in capsys.readouterr().err


def test_bad_arguments_are_refused_in_one_sentence(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pipeline", "run", str(tmp_path / "missing.py")]) == cli.EXIT_USAGE
    assert "is not a Python file" in capsys.readouterr().err
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert cli.main(["pipeline", "run", str(tmp_path / "empty.py")]) == cli.EXIT_USAGE
    assert "defines no pipeline" in capsys.readouterr().err


def test_a_cluster_that_cannot_be_had_exits_3(tmp_path: Path, name: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flow.py").write_text(PIPELINES)
    monkeypatch.setenv("PIPELINE_NAME", name)
    spec = f"{tmp_path / 'flow.py'}:other"
    (tmp_path / "dask.yaml").write_text("mlcloud: [unclosed\n")
    assert cli.main(["pipeline", "run", spec, "--cluster-config",
                     str(tmp_path / "dask.yaml")]) == cli.EXIT_CLUSTER
    assert "cannot be read as YAML" in capsys.readouterr().err
    assert cli.main(["pipeline", "run", spec, "--scheduler", "tcp://x:1", "--cluster-config",
                     str(tmp_path / "dask.yaml")]) == cli.EXIT_CLUSTER
    assert "give --scheduler or --cluster-config, not both." in capsys.readouterr().err
