"""%mlcloud through a real IPython InteractiveShell, on real clusters."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import api as clusters
from tests.conftest import discovery_files, ipython_shell, wait_for


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    with ipython_shell() as ip:
        yield ip


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
    assert "owner" in capsys.readouterr().out and clusters.handles() == []


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
    assert discovery_files() == [] and clusters.handles() == []


def test_duplicate_name_in_magic(shell: InteractiveShell) -> None:
    with mlc.up(workers=1, name="taken"):
        with pytest.raises(UsageError, match="a cluster named 'taken' already exists"):
            shell.run_line_magic("mlcloud", "up --workers 1 --name taken")


def _parsers(magic: str) -> list[argparse.ArgumentParser]:
    """The parsers behind a magic: its own, and for %mlcloud each subcommand's."""
    from jupyter_mlcloud.magics import SUBCOMMAND_PARSERS, MLCloudMagics

    own = getattr(MLCloudMagics, magic).parser
    return [own, *SUBCOMMAND_PARSERS.values()] if magic == "mlcloud" else [own]


def _squeezed(text: str) -> str:
    # argparse wraps help text (at hyphens too): compare with every space taken out.
    return "".join(text.split())


def _help_text(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    # What the formatter prints for help="...%(choices)s..." (argparse's _expand_help).
    params = dict(vars(action), prog=parser.prog)
    if action.choices is not None:
        params["choices"] = ", ".join(map(str, action.choices))
    return (action.help or "") % params


@pytest.mark.parametrize("name", ["%mlcloud", "%%distributed_train", "%%batch_score",
                                  "%batch_score", "%%tune"])
def test_question_mark_help_documents_every_option(shell: InteractiveShell, name: str) -> None:
    shown = shell.object_inspect_text(name)  # what `name?` prints
    parsers = _parsers(name.lstrip("%"))
    actions = [(p, a) for p in parsers for a in p._actions]
    assert len(actions) > len(parsers)  # each has options beyond its -h/--help
    missing = [f for _, a in actions for f in a.option_strings if f not in shown]
    missing += [a.metavar or a.dest for _, a in actions
                if not a.option_strings and (a.metavar or a.dest) not in shown]
    assert not missing, f"{name}? does not document {missing}"
    undescribed = [a.option_strings or a.dest for p, a in actions
                   if not a.help or _squeezed(_help_text(a, p)) not in _squeezed(shown)]
    assert not undescribed, f"{name}? lacks the help of {undescribed}"


def test_mlcloud_help_lists_every_subcommand(shell: InteractiveShell) -> None:
    from jupyter_mlcloud.magics import SUBCOMMAND_PARSERS, SUBCOMMANDS

    shown = shell.object_inspect_text("%mlcloud")
    assert tuple(SUBCOMMAND_PARSERS) == SUBCOMMANDS
    for name in SUBCOMMANDS:
        assert f"usage: %mlcloud {name} " in shown


def test_help_flag_prints_the_help_and_runs_nothing(shell: InteractiveShell,
                                                    capsys: pytest.CaptureFixture) -> None:
    shell.run_line_magic("mlcloud", "--help")
    assert "%mlcloud connect" in capsys.readouterr().out
    assert shell.run_cell_magic("distributed_train", "--workers 2 --help", "raise ValueError") \
        is None
    assert "--checkpoint-keep" in capsys.readouterr().out
    shell.run_line_magic("batch_score", "-h")
    assert "--sample-dim" in capsys.readouterr().out
    assert clusters.handles() == []


def _run(shell: InteractiveShell, magic: str, line: str) -> object:
    if magic.startswith("%%"):
        return shell.run_cell_magic(magic[2:], line, "rows")
    return shell.run_line_magic(magic[1:], line)


@pytest.mark.parametrize(
    ("magic", "line", "parser_of"),
    [
        ("%mlcloud", "up --nodes 2", "up"),
        ("%mlcloud", "status --nodes 2", "status"),
        ("%%distributed_train", "--nodes 2", "distributed_train"),
        ("%%batch_score", "model --nodes 2", "batch_score"),
        ("%batch_score", "model rows --nodes 2", "batch_score"),
    ],
)
def test_an_unknown_option_is_one_sentence_naming_it_and_the_options(
        shell: InteractiveShell, magic: str, line: str, parser_of: str) -> None:
    from jupyter_mlcloud.magics import SUBCOMMAND_PARSERS, MLCloudMagics

    parser = (SUBCOMMAND_PARSERS[parser_of] if magic == "%mlcloud"
              else getattr(MLCloudMagics, parser_of).parser)
    with pytest.raises(UsageError) as err:
        _run(shell, magic, line)
    message = str(err.value)
    assert message.startswith(magic) and "unrecognized arguments: --nodes 2" in message
    options = [f for a in parser._actions if "--help" not in a.option_strings
               for f in a.option_strings]
    assert all(f in message for f in options), message
    assert "\n" not in message and message.endswith(".") and ". " not in message


@pytest.mark.parametrize(
    ("magic", "line", "message"),
    [
        ("%mlcloud", "up --workers two", r"^%mlcloud up: argument --workers: expected a whole"
                                         r" number, got 'two'; see `%mlcloud up --help`\.$"),
        ("%mlcloud", "scale 2 --timeout 3", "unrecognized arguments: --timeout 3"),
        ("%%distributed_train", "--workers 2 --seed x",
         r"^%%distributed_train: argument --seed: expected a whole number, got 'x'; see"
         r" `%%distributed_train\?`\.$"),
        ("%%distributed_train", "--wrkers 2", r"--wrkers 2 \(did you mean --workers\?\)"),
        ("%%distributed_train", "--checkpoint x", "ambiguous option: --checkpoint could match"),
        ("%batch_score", "model rows --batch-size big",
         r"^%batch_score: argument --batch-size: expected a whole number, got 'big'"),
        ("%batch_score", "model", "^%batch_score: the following arguments are required: data;"),
        ("%%batch_score", "model rows",
         r"^%%batch_score: unrecognized arguments: rows \(the cell gives the data\)"),
        ("%%batch_score", "", "^%%batch_score: the following arguments are required: model"),
        ("%%batch_score", "model --out 'a", r"^%%batch_score: cannot parse"),
    ],
)
def test_bad_lines_of_each_magic_raise_one_usage_error(shell: InteractiveShell, magic: str,
                                                       line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        _run(shell, magic, line)
    assert "\n" not in str(err.value)
    assert clusters.handles() == []


def test_quoted_values_lose_their_quotes(shell: InteractiveShell) -> None:
    # As in a shell: the value is what is inside the quotes.
    with pytest.raises(UsageError, match="cluster name 'a b' is not allowed"):
        shell.run_line_magic("mlcloud", "up --name \"a b\"")
