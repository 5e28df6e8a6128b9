"""Endpoints as the command-line front ends show and manage them by name: a table of what
runs on a cluster, one endpoint looked up by its name, and its CA certificate written to a
file.

Shared by ``%mlcloud endpoints|unserve`` and ``jupyter-mlcloud endpoints|serve|unserve``, so
both show the same columns and say the same sentence for a name that does not run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..cluster import api as clusters
from . import control
from .api import Endpoint, endpoints

if TYPE_CHECKING:
    import pandas as pd

#: The table's columns: versions read ``v1 90%, v2 10%``; figures are the router's.
COLUMNS = ("name", "url", "versions", "replicas", "autoscale", "rps", "p50_ms", "p99_ms",
           "errors")


def versions_text(versions: list[dict[str, Any]]) -> str:
    """``v1 90%, v2 10%``: the live versions with their shares of the traffic."""
    return ", ".join(f"v{v['version']} {v['weight']:.0%}" for v in versions)


def row(endpoint: Endpoint) -> dict[str, Any]:
    """One endpoint's row of :func:`table` (no figures when its router does not answer)."""
    try:
        figures = endpoint.stats()
    except Exception:
        figures = {}
    versions = endpoint.versions
    bounds = endpoint.autoscale
    return {"name": endpoint.name, "url": endpoint.url, "versions": versions_text(versions),
            "replicas": sum(v["replicas"] for v in versions),
            "autoscale": f"{bounds[0]}:{bounds[1]}" if bounds else "",
            "rps": figures.get("rps"), "p50_ms": figures.get("p50_ms"),
            "p99_ms": figures.get("p99_ms"), "errors": figures.get("errors")}


def table(cluster: Any = None) -> pd.DataFrame:
    """The endpoints running on ``cluster``, one row each (see :data:`COLUMNS`)."""
    import pandas as pd

    return pd.DataFrame([row(ep) for ep in endpoints(cluster)], columns=list(COLUMNS))


def find(name: str, cluster: Any = None) -> Endpoint:
    """Endpoint ``name`` on ``cluster``; ValueError naming those that run if it does not."""
    client = clusters.resolve_client(cluster)
    try:
        return Endpoint(client, control.read(client, name))
    except LookupError:
        running = control.names(client)
        raise ValueError(f"no endpoint named {name!r} runs on this cluster; running:"
                         f" {', '.join(running) or 'none'}.") from None


def write_ca(endpoint: Endpoint, path: str | os.PathLike[str]) -> str:
    """Write the PEM that verifies ``endpoint``'s certificate to ``path``; the path written."""
    with open(path, "wb") as f:
        f.write(endpoint._desc["ca_pem"])
    return os.fspath(path)
