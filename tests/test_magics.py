"""%mlcloud through a real IPython InteractiveShell, on real clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import jupyter_mlcloud as mlc

from .conftest import discovery_files, wait_for


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "jupyter_mlcloud")
    yield ip
    InteractiveShell.clear_instance()


def test_up_status_scale_adapt_down(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    shell.run_line_magic("mlcloud", "up --workers 1 --name nb --threads-per-worker 1 --cpu")
    cluster = mlc.current()
    assert (cluster.name, cluster.kind, cluster.info()["workers"]) == ("nb", "local-cpu", 1)
    out = capsys.readouterr().out
    assert "VBox" in out  # the card was displayed (a plain shell prints the widget's repr)

    shell.run_line_magic("mlcloud", "status")
    assert "nb" in capsys.readouterr().out

    shell.run_line_magic("mlcloud", "scale 2")
    assert "Scaling nb to 2 worker(s)." in capsys.readouterr().out
    wait_for(lambda: cluster.info()["workers"] == 2, what="2 workers")

    shell.run_line_magic("mlcloud", "adapt 1 3 --name nb")
    assert "adapts between 1 and 3" in capsys.readouterr().out
    assert cluster.cluster._adaptive.maximum == 3

    shell.run_line_magic("mlcloud", "down")
    assert "Shut down nb." in capsys.readouterr().out
    assert cluster.closed and discovery_files() == []


def test_connect_and_down_all(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    owner = mlc.up(workers=1, name="owner")
    shell.run_line_magic("mlcloud", f"connect {owner.address} --name viewer")
    assert mlc.current().name == "viewer"
    shell.run_line_magic("mlcloud", "down --all")
    assert "owner" in capsys.readouterr().out and mlc.clusters.handles() == []


def test_help_prints_usage_without_error(shell: InteractiveShell,
                                         capsys: pytest.CaptureFixture) -> None:
    shell.run_line_magic("mlcloud", "up --help")
    assert "--adapt MIN:MAX" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "the following arguments are required"),
        ("launch", "invalid choice: 'launch'"),
        ("up --nodes 2", "unrecognized arguments: --nodes 2"),
        ("up --workers 0", "workers must be an integer >= 1, got 0"),
        ("up --workers -1", "workers must be an integer >= 1, got -1"),
        ("up --workers two", "expected a whole number, got 'two'"),
        ("up --adapt 1-4", "adapt must be MIN:MAX .* got '1-4'"),
        ("up --gpu", "NVML sees no NVIDIA GPU"),
        ("up --gpu --cpu", "not allowed with argument"),
        ("up --address tcp://127.0.0.1:9 --timeout 1", "could not reach a Dask scheduler"),
        ("connect tcp://127.0.0.1:9 --timeout 1", "could not reach a Dask scheduler"),
        ("scale 2", "there is no cluster in this process"),
        ("scale -1 --name x", "no cluster named 'x'"),
        ("down --name a --all", "not allowed with argument"),
        ("up --name 'bad name'", "cluster name 'bad name' is not allowed"),
        ("up --name 'unclosed", "cannot parse"),
    ],
)
def test_bad_input_raises_one_usage_error(shell: InteractiveShell, line: str,
                                          message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        shell.run_line_magic("mlcloud", line)
    assert "\n" not in str(err.value).strip()
    assert discovery_files() == [] and mlc.clusters.handles() == []


def test_duplicate_name_in_magic(shell: InteractiveShell) -> None:
    with mlc.up(workers=1, name="taken"):
        with pytest.raises(UsageError, match="a cluster named 'taken' already exists"):
            shell.run_line_magic("mlcloud", "up --workers 1 --name taken")


def test_question_mark_help_documents_every_option(shell: InteractiveShell) -> None:
    from jupyter_mlcloud.magics import _PARSER, _SCORE_CELL_PARSER, _TRAIN_PARSER

    magics = shell.magics_manager.magics
    docs = {"mlcloud": magics["line"]["mlcloud"].__doc__,
            "distributed_train": magics["cell"]["distributed_train"].__doc__,
            "batch_score": magics["cell"]["batch_score"].__doc__}
    subcommands = [a for a in _PARSER._actions if a.dest == "command"][0].choices.values()
    for name, parsers in (("mlcloud", list(subcommands)),
                          ("distributed_train", [_TRAIN_PARSER]),
                          ("batch_score", [_SCORE_CELL_PARSER])):
        flags = {f for p in parsers for a in p._actions for f in a.option_strings}
        missing = sorted(f for f in flags if f not in docs[name])
        assert not missing, f"{name}? does not document {missing}"
