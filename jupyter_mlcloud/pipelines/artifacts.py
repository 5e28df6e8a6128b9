"""A step's file outputs, written under a temporary name and published only on success.

The same protocol as checkpoints (``step-N.done`` beside ``step-N``) and scoring outputs
(``_mlcloud_score.json``): data first, the completion marker last, and a location without its
marker is never trusted. A step writes to ``NAME.mlcloud-tmp-TOKEN.SUFFIX`` beside the
location; when it returns, the old marker is removed first (never a marker over half-replaced
data), the temporary name is moved onto the location, and ``LOCATION.mlcloud-done`` is written
with the content's digest. A step killed mid-way leaves only a temporary name, removed by the
next run of the step.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from . import cache

MARKER = ".mlcloud-done"
STAGING = ".mlcloud-tmp-"


def _fs(location: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(location)  # type: ignore[no-any-return]


def resolve(location: str, root: str) -> str:
    """An absolute path (relative ones under the pipeline's root) or the URL as given."""
    if cache.is_url(location):
        return location
    return os.path.normpath(os.path.join(root, os.path.expanduser(cache.local_path(location))))


def staging(location: str) -> str:
    """A fresh temporary name beside ``location`` (same folder: the move is a rename); stale
    ones left by a killed step are removed first. The parent folder is created."""
    discard_stale(location)
    fs, path = _fs(location)
    fs.makedirs(os.path.dirname(path.rstrip("/")) or ".", exist_ok=True)
    base, ext = os.path.splitext(location.rstrip("/"))
    # The suffix is kept: writers choose the format by it (.zarr), or append theirs (.npz).
    return f"{base}{STAGING}{uuid.uuid4().hex[:12]}{ext}"


def discard_stale(location: str) -> None:
    """Remove temporary names of ``location`` that earlier, killed steps left."""
    fs, path = _fs(location)
    base, ext = os.path.splitext(path.rstrip("/"))
    for stale in fs.glob(f"{base}{STAGING}*{ext}"):
        fs.rm(stale, recursive=True)


def discard(temporary: str) -> None:
    """Remove a temporary name (the step failed): nothing half-written stays."""
    fs, path = _fs(temporary)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def written(temporary: str) -> bool:
    fs, path = _fs(temporary)
    return bool(fs.exists(path))


def publish(temporary: str, location: str, *, pipeline: str, step: str) -> str:
    """Move ``temporary`` onto ``location`` and mark it complete; returns its digest."""
    fs, path = _fs(location)
    marker = path.rstrip("/") + MARKER
    if fs.exists(marker):
        fs.rm(marker)  # unmark first: a marker never stands beside half-replaced data
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.mv(_fs(temporary)[1], path, recursive=True)
    value = cache.digest(location)
    assert value is not None
    with fs.open(marker, "w") as f:
        json.dump({"digest": value, "stamp": cache.stamp(location)
                   if not cache.is_url(location) else None,
                   "pipeline": pipeline, "step": step, "time": time.time()}, f)
    return value


def complete_digest(location: str) -> str | None:
    """The digest of a published output, if it is still there, marked and unchanged since;
    None otherwise (then the step that made it runs again)."""
    fs, path = _fs(location)
    try:
        with fs.open(path.rstrip("/") + MARKER, "r") as f:
            mark = json.load(f)
    except (OSError, ValueError):
        return None
    if not cache.is_url(location):
        now = cache.stamp(location)
        if now is None:
            return None
        if now != mark.get("stamp") and cache.digest(location) != mark.get("digest"):
            return None  # changed by hand since the step wrote it
    elif not fs.exists(path):
        return None
    return str(mark.get("digest"))
