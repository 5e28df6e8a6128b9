"""Discovery files: one small JSON file per live cluster in the Jupyter runtime dir.

Any process that starts (or attaches to) a cluster writes one, so the sidebar sees
clusters made in notebooks and notebooks can attach to clusters made elsewhere.
A file whose owner process is gone is stale: it is ignored and removed on read.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ClusterRecord:
    """What a discovery file says about one cluster."""

    name: str
    kind: str
    address: str | None = None
    dashboard: str | None = None
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    user: str = field(default_factory=lambda: _user())
    owner: str = "python"
    created: float = field(default_factory=time.time)
    status: str = "starting"
    tls: bool = False
    gpus: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def owned_here(self) -> bool:
        """True when this process is the one that wrote the record."""
        return self.pid == os.getpid() and self.host == socket.gethostname()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def discovery_dir() -> Path:
    """Folder holding the discovery files (inside the Jupyter runtime dir)."""
    return Path(jupyter_runtime_dir()) / "mlcloud-clusters"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid cluster name, else raise ``ValueError``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"cluster name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit."
        )
    return name


def _path(name: str) -> Path:
    return discovery_dir() / f"{name}.json"


def _alive(record: ClusterRecord) -> bool:
    if record.host != socket.gethostname():
        return True  # cannot check another machine's processes; trust the file
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read(path: Path) -> ClusterRecord | None:
    try:
        return ClusterRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def reserve(record: ClusterRecord) -> None:
    """Claim ``record.name`` atomically, across processes, before anything starts.

    Raises ``ValueError`` if a live cluster already uses the name.
    """
    check_name(record.name)
    folder = discovery_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = _path(record.name)
    tmp = folder / f".{record.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record.to_dict()))
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)  # atomic, and fails if the name is taken
                return
            except FileExistsError:
                existing = _read(path)
                if existing is not None and _alive(existing):
                    raise ValueError(
                        f"a cluster named {record.name!r} already exists (owned by pid "
                        f"{existing.pid} on {existing.host}); choose another name or shut it"
                        " down first."
                    ) from None
                # Stale (dead owner) or unreadable: clean it and try once more.
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        raise ValueError(f"could not reserve cluster name {record.name!r}; try again.")
    finally:
        tmp.unlink()


def write(record: ClusterRecord) -> None:
    """Write (or rewrite) the record atomically: readers never see half a file."""
    folder = discovery_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{record.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record.to_dict()))
    os.replace(tmp, _path(record.name))


def remove(name: str, *, pid: int | None = None) -> None:
    """Delete the file for ``name`` (only if written by ``pid``, when given)."""
    path = _path(name)
    if pid is not None:
        existing = _read(path)
        if existing is None or existing.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def get(name: str) -> ClusterRecord | None:
    """The live record called ``name``, or None."""
    return next((r for r in list_records() if r.name == name), None)


def list_records() -> list[ClusterRecord]:
    """All live records, oldest first; stale and unreadable files are removed."""
    folder = discovery_dir()
    if not folder.is_dir():
        return []
    records = []
    for path in folder.glob("*.json"):
        record = _read(path)
        if record is None or not _alive(record):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        records.append(record)
    return sorted(records, key=lambda r: r.created)
