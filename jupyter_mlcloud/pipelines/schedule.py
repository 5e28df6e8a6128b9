"""Schedules that need no Jupyter server: a crontab entry, or a systemd user timer.

Both run ``python -m jupyter_mlcloud.cli pipeline run FILE.py[:NAME]`` with this interpreter,
from the working directory the schedule was made in, with this process's MLflow store
(``MLFLOW_TRACKING_URI``) so scheduled runs share the notebook's cache. An entry is tagged
with the pipeline's name: scheduling it again replaces it. A run that finds the previous one
still going is refused by the run lock, so slow nights never overlap.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

#: The command that reads and writes the user's crontab (tests point it at a file of theirs).
CRONTAB_ENV = "MLCLOUD_CRONTAB"
SYSTEMD_DIR_ENV = "MLCLOUD_SYSTEMD_DIR"
NICKNAMES = {"@hourly": "hourly", "@daily": "daily", "@midnight": "daily", "@weekly": "weekly",
             "@monthly": "monthly", "@yearly": "yearly", "@annually": "yearly"}
FIELD = re.compile(r"[0-9A-Za-z*/,\-]+")
DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
VIAS = ("cron", "systemd")


def check_cron(cron: str) -> str:
    """``cron`` if it is five crontab fields (or a nickname such as @daily)."""
    text = " ".join(str(cron).split())
    if text in NICKNAMES or (len(text.split()) == 5 and all(FIELD.fullmatch(f)
                                                           for f in text.split())):
        return text
    raise ValueError(f"--cron {cron!r} is not a schedule; give five crontab fields (minute hour"
                     " day-of-month month day-of-week), e.g. '0 2 * * *', or one of"
                     f" {', '.join(NICKNAMES)}.")


def command(spec: str, *, scheduler: str | None = None, cluster_config: str | None = None,
            workdir: str | None = None, log: str | None = None) -> str:
    """The shell command a schedule runs: cd, the MLflow store, the run, its log."""
    from .script import split_spec

    path, name = split_spec(spec)
    target = os.path.abspath(path) + (f":{name}" if name else "")
    argv = [sys.executable, "-m", "jupyter_mlcloud.cli", "pipeline", "run", target]
    if scheduler:
        argv += ["--scheduler", scheduler]
    if cluster_config:
        argv += ["--cluster-config", os.path.abspath(cluster_config)]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("MLFLOW_TRACKING_URI",
                                                          "MLFLOW_EXPERIMENT_NAME")
           if os.environ.get(k)]
    workdir = os.path.abspath(workdir or os.getcwd())
    log = os.path.abspath(log) if log else os.path.join(workdir, "pipeline-run.log")
    return (f"cd {shlex.quote(workdir)} && " + " ".join(env + [shlex.quote(a) for a in argv])
            + f" >> {shlex.quote(log)} 2>&1")


def tag(pipeline: str) -> str:
    return f"# jupyter-mlcloud pipeline {pipeline}"


def crontab_entry(cron: str, run_command: str, pipeline: str) -> str:
    """One crontab line; ``%`` is escaped (cron reads it as a newline)."""
    return f"{check_cron(cron)} {run_command.replace('%', chr(92) + '%')} {tag(pipeline)}"


def _crontab() -> list[str]:
    return shlex.split(os.environ.get(CRONTAB_ENV) or "crontab")


def install_crontab(entry: str, pipeline: str) -> str:
    """Add ``entry`` to the user's crontab, replacing the pipeline's earlier one; returns the
    new crontab."""
    tool = _crontab()
    if shutil.which(tool[0]) is None:
        raise ValueError(f"there is no {tool[0]!r} command here; use --via systemd, or --print"
                         " and add the line to your scheduler.")
    current = subprocess.run(tool + ["-l"], capture_output=True, text=True)
    lines = current.stdout.splitlines() if current.returncode == 0 else []  # no crontab yet
    kept = [line for line in lines if not line.endswith(tag(pipeline))]
    text = "\n".join(kept + [entry]) + "\n"
    done = subprocess.run(tool + ["-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"crontab refused the entry: {done.stderr.strip()}")
    return text


def _calendar_field(value: str, kind: str) -> str:
    if value == "*":
        return "*"
    out = []
    for part in value.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            base = "0" if kind in ("minute", "hour") else "1"
        if "-" in base and step:
            raise ValueError(f"the cron field {value!r} ({kind}) has a stepped range, which a"
                             " systemd timer cannot say; use --via cron.")
        out.append(base.replace("-", "..") + (f"/{step}" if step else ""))
    return ",".join(out)


def on_calendar(cron: str) -> str:
    """The systemd ``OnCalendar=`` of a crontab schedule."""
    cron = check_cron(cron)
    if cron in NICKNAMES:
        return NICKNAMES[cron]
    minute, hour, dom, month, dow = cron.split()
    if dom != "*" and dow != "*":
        raise ValueError(f"--cron {cron!r} names both days of the month and of the week (cron"
                         " runs on either, a systemd timer only on both); use --via cron.")
    days = ""
    if dow != "*":
        if not re.fullmatch(r"[0-7](?:[-,][0-7])*", dow):
            raise ValueError(f"the day of the week {dow!r} of --cron {cron!r} must be digits"
                             " 0-7 for a systemd timer; use --via cron.")
        days = re.sub(r"[0-7]", lambda m: DAYS[int(m.group())], dow).replace("-", "..") + " "
    return (f"{days}*-{_calendar_field(month, 'month')}-{_calendar_field(dom, 'day')}"
            f" {_calendar_field(hour, 'hour')}:{_calendar_field(minute, 'minute')}:00")


def systemd_units(cron: str, run_command: str, pipeline: str) -> dict[str, str]:
    """The service and timer units (file name -> text) of a user timer."""
    unit = f"mlcloud-pipeline-{pipeline}"
    return {
        f"{unit}.service": ("[Unit]\nDescription=jupyter-mlcloud pipeline"
                            f" {pipeline}\n\n[Service]\nType=oneshot\n"
                            f"ExecStart=/bin/sh -c {shlex.quote(run_command)}\n"),
        f"{unit}.timer": (f"[Unit]\nDescription=Run pipeline {pipeline} on schedule\n\n"
                          f"[Timer]\nOnCalendar={on_calendar(cron)}\nPersistent=true\n\n"
                          "[Install]\nWantedBy=timers.target\n"),
    }


def install_systemd(units: dict[str, str]) -> str:
    """Write the units to the user's systemd folder and start the timer."""
    if shutil.which("systemctl") is None:
        raise ValueError("there is no systemctl here; use --via cron, or --print.")
    folder = os.environ.get(SYSTEMD_DIR_ENV) or os.path.expanduser("~/.config/systemd/user")
    os.makedirs(folder, exist_ok=True)
    for name, text in units.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    timer = next(n for n in units if n.endswith(".timer"))
    for argv in (["systemctl", "--user", "daemon-reload"],
                 ["systemctl", "--user", "enable", "--now", timer]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return "\n".join(f"# {os.path.join(folder, n)}\n{t}" for n, t in units.items())


def default_via() -> str:
    """cron where there is a crontab command, else systemd where there is systemctl."""
    if shutil.which(_crontab()[0]):
        return "cron"
    return "systemd" if shutil.which("systemctl") else "cron"


def schedule(spec: str, cron: str, *, via: str | None = None, print_only: bool = False,
             scheduler: str | None = None, cluster_config: str | None = None,
             log: str | None = None, workdir: str | None = None) -> str:
    """Schedule ``spec`` (``FILE.py[:NAME]``) to run at ``cron``; returns what was (or with
    ``print_only``, would be) installed. The file is loaded first, so a broken pipeline is
    refused now rather than failing at 2 a.m."""
    from .script import load

    if via is not None and via not in VIAS:
        raise ValueError(f"--via {via!r} is not allowed; use one of {', '.join(VIAS)}.")
    check_cron(cron)
    pipe = load(spec)
    pipe.order()
    run_command = command(spec, scheduler=scheduler, cluster_config=cluster_config,
                          workdir=workdir, log=log)
    via = via or default_via()
    if via == "systemd":
        units = systemd_units(cron, run_command, pipe.name)
        if print_only:
            return "\n".join(f"# {n}\n{t}" for n, t in units.items())
        return install_systemd(units)
    entry = crontab_entry(cron, run_command, pipe.name)
    return entry if print_only else install_crontab(entry, pipe.name)
