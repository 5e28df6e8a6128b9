"""Endpoints that serve ``models:/NAME@ALIAS`` follow the alias: when it moves to another
registered version, the controller rolls that version out with the endpoint's canary share.

:func:`moved` runs as a task on a worker (which has torch and MLflow, and reaches the
tracking store), never on the scheduler: it reads where the alias points and, if that is not
the version served, loads the new one as bytes for the controller to start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: How often the controller asks where a followed alias points.
INTERVAL_S = 5.0


@contextmanager
def _store(uri: str) -> Iterator[None]:
    """MLflow's store set to ``uri`` for the block (loading reads the store in force)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def moved(uri: str, tracking_uri: str, served: int) -> tuple[int, Any] | None:
    """On a worker: ``(version, ModelBlob)`` if ``uri``'s alias now points at a registered
    version other than ``served``; None if it has not moved."""
    from ..scoring.model import ModelBlob
    from ..tracking import registry

    target = registry.alias_of(uri)
    if target is None:
        return None
    name, alias = target
    with _store(tracking_uri):
        version = registry.alias_version(name, alias, tracking_uri)
        if version == served:
            return None
        return version, ModelBlob.of(f"models:/{name}/{version}")
