"""Schedules: crontab lines and systemd timers, shown with --print or written to a crontab of
the test's own (MLCLOUD_CRONTAB): the user's crontab is never touched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jupyter_mlcloud import cli
from jupyter_mlcloud.pipelines import schedule

PIPELINE = """
import jupyter_mlcloud as mlc
pipe = mlc.pipeline("nightly")

@pipe.step(outputs=["n"])
def count():
    return 1
"""

FAKE_CRONTAB = """
import sys
path = {path!r}
if sys.argv[1] == "-l":
    try:
        sys.stdout.write(open(path).read())
    except FileNotFoundError:
        sys.exit("no crontab for user")
else:
    open(path, "w").write(sys.stdin.read())
"""


@pytest.fixture
def spec(tmp_path: Path) -> str:
    path = tmp_path / "nightly.py"
    path.write_text(PIPELINE)
    return str(path)


def test_print_shows_the_crontab_line(spec: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/mlruns.db")
    code = cli.main(["pipeline", "schedule", spec, "--cron", "0 2 * * *", "--print",
                     "--via", "cron", "--scheduler", "tcp://10.0.0.5:8786"])
    line = capsys.readouterr().out.strip()
    assert code == 0
    assert line.startswith("0 2 * * * cd ")
    assert f"{sys.executable} -m jupyter_mlcloud.cli pipeline run {spec}" in line
    assert "--scheduler tcp://10.0.0.5:8786" in line
    assert "MLFLOW_TRACKING_URI=sqlite:////data/mlruns.db" in line
    assert line.endswith("# jupyter-mlcloud pipeline nightly")


def test_install_replaces_the_pipelines_earlier_entry(spec: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "crontab.txt"
    table.write_text("5 * * * * echo keep-me\n")
    tool = tmp_path / "fake_crontab.py"
    tool.write_text(FAKE_CRONTAB.format(path=str(table)))
    monkeypatch.setenv(schedule.CRONTAB_ENV, f"{sys.executable} {tool}")
    assert cli.main(["pipeline", "schedule", spec, "--cron", "0 2 * * *"]) == 0
    assert cli.main(["pipeline", "schedule", spec, "--cron", "@hourly"]) == 0
    lines = table.read_text().splitlines()
    assert lines[0] == "5 * * * * echo keep-me"
    assert len(lines) == 2 and lines[1].startswith("@hourly cd ")


def test_systemd_timers_and_bad_schedules(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule.on_calendar("0 2 * * *") == "*-*-* 2:0:00"
    assert schedule.on_calendar("*/15 8-18 * * 1-5") == "Mon..Fri *-*-* 8..18:0/15:00"
    assert schedule.on_calendar("@daily") == "daily"
    assert cli.main(["pipeline", "schedule", spec, "--cron", "30 1 * * 0", "--print",
                     "--via", "systemd"]) == 0
    out = capsys.readouterr().out
    assert "OnCalendar=Sun *-*-* 1:30:00" in out and "Type=oneshot" in out
    assert cli.main(["pipeline", "schedule", spec, "--cron", "0 2 * *", "--print"]) == 2
    assert "--cron '0 2 * *' is not a schedule" in capsys.readouterr().err
    assert cli.main(["pipeline", "schedule", spec, "--cron", "@daily", "--via", "at"]) == 2
    assert "--via 'at' is not allowed; use one of cron, systemd." in capsys.readouterr().err
    with pytest.raises(ValueError, match="both days of the month and of the week"):
        schedule.on_calendar("0 0 1 * 1")
