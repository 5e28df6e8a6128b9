"""Request handlers: authenticate, call the API, answer JSON. No logic of their own."""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from .. import clusters


class ClustersHandler(APIHandler):
    """``GET /mlcloud/clusters``: every discovered cluster with live worker figures."""

    @tornado.web.authenticated
    async def get(self) -> None:
        entries = await clusters.list_clusters_async(timeout=2.0)
        self.finish(json.dumps({"clusters": entries}))


def route_table(base_url: str) -> list[tuple[str, Any]]:
    """The extension's routes, under ``base_url``."""
    return [(url_path_join(base_url, "mlcloud", "clusters"), ClustersHandler)]
