"""Request handlers: authenticate, call the API, answer JSON. No logic of their own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler, AuthenticatedFileHandler, JupyterHandler
from jupyter_server.utils import url_path_join

from .. import cluster_info, clusters, discovery, panels, runs

# What the "new cluster" form may send, and the API option each one is.
START_OPTIONS = ("name", "workers", "threads_per_worker", "memory_limit", "gpu", "adapt")


def _refuse(handler: Any, status: int, message: str) -> None:
    """Answer ``status`` with the API's one sentence as ``{"message": ...}``."""
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps({"message": message}))


class _Handler(APIHandler):
    """JSON in and out; a ValueError from the API becomes a 400 with its one sentence."""

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="the request body is not JSON") from None
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(400, reason="the request body must be a JSON object")
        return data

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking API call off the event loop; ValueError -> 400 with its message."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: fn(*args, **kwargs))
        except ValueError as e:
            self.set_status(400)
            self.finish(json.dumps({"message": str(e)}))
            return None

    def refuse(self, status: int, message: str) -> None:
        _refuse(self, status, message)


class ClustersHandler(_Handler):
    """``GET /mlcloud/clusters``: every discovered cluster, live figures.
    ``POST``: start a cluster owned by this server (JSON options as ``mlcloud.up``)."""

    @tornado.web.authenticated
    async def get(self) -> None:
        entries = await clusters.list_clusters_async(timeout=2.0)
        self.finish(json.dumps({"clusters": entries}))

    @tornado.web.authenticated
    async def post(self) -> None:
        options = self.body()
        unknown = sorted(set(options) - set(START_OPTIONS))
        if unknown:
            return self.refuse(400, f"unknown options {unknown}; allowed: {list(START_OPTIONS)}.")
        handle = await self.call(clusters.up, **options)
        if handle is not None:
            self.set_status(201)
            self.finish(json.dumps(await self.call(handle.info)))


class ClusterHandler(_Handler):
    """``PATCH /mlcloud/clusters/<name>`` with ``{"workers": N}`` or
    ``{"adapt": [MIN, MAX]}``; ``DELETE`` shuts a cluster of this server down."""

    @tornado.web.authenticated
    async def patch(self, name: str) -> None:
        change = self.body()
        if set(change) == {"workers"}:
            done = await self.call(clusters.scale, change["workers"], name=name)
        elif set(change) == {"adapt"} and isinstance(change["adapt"], list):
            done = await self.call(clusters.adapt, *change["adapt"], name=name)
        else:
            return self.refuse(400, 'send {"workers": N} or {"adapt": [MIN, MAX]}.')
        if done is not None:
            self.finish(json.dumps({"name": name, **change}))

    @tornado.web.authenticated
    async def delete(self, name: str) -> None:
        closed = await self.call(clusters.down, name=name)
        if closed is not None:
            self.set_status(204)
            self.finish()


class RunMetricsHandler(_Handler):
    """``GET /mlcloud/runs/<id>/metrics``: rank 0's points as columns (the loss panel's data)."""

    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        points = await runs.run_points(run_id)
        if points is None:
            return self.refuse(404, f"no run {run_id!r} on any discovered cluster.")
        self.finish(json.dumps(runs.metric_columns(points)))


class ClusterResourcesHandler(_Handler):
    """``GET /mlcloud/clusters/<name>/resources``: per-worker CPU, memory, GPU columns."""

    @tornado.web.authenticated
    async def get(self, name: str) -> None:
        record = discovery.get(name)
        if record is None or not record.address:
            return self.refuse(404, f"no cluster named {name!r}.")
        columns = await cluster_info.worker_resources(record.address)
        if columns is None:
            return self.refuse(503, f"the scheduler of {name!r} is not answering; retrying.")
        self.finish(json.dumps(columns))


class PanelHandler(JupyterHandler):
    """``GET /mlcloud/panels/loss/<run>`` and ``/mlcloud/panels/resources/<cluster>``: the
    Bokeh panels as pages, for sidebar tabs (a page handler: API handlers forbid scripts)."""

    def refuse(self, status: int, message: str) -> None:
        _refuse(self, status, message)

    @tornado.web.authenticated
    async def get(self, kind: str, target: str) -> None:
        root = url_path_join(self.base_url, "mlcloud")
        bokeh_root = url_path_join(root, "bokeh") + "/"
        if kind == "loss":
            points = await runs.run_points(target)
            if points is None:
                return self.refuse(404, f"no run {target!r} on any discovered cluster.")
            metrics = [m for m in runs.metric_columns(points) if m != "step"]
            data_url = url_path_join(root, "runs", target, "metrics")
            panel = panels.loss_panel(data_url, metrics, title=f"run {target}")
        else:
            if discovery.get(target) is None:
                return self.refuse(404, f"no cluster named {target!r}.")
            data_url = url_path_join(root, "clusters", target, "resources")
            panel = panels.resources_panel(data_url, title=f"cluster {target}")
        self.set_header("Content-Type", "text/html")
        self.finish(panels.page(panel, bokeh_root, f"ML Cloud {kind}: {target}"))


class BokehStaticHandler(AuthenticatedFileHandler):
    """BokehJS, served by Jupyter itself behind its authentication: no CDN, no extra port."""


class RunsHandler(_Handler):
    """``GET /mlcloud/runs``: every training run on the discovered clusters, newest first."""

    @tornado.web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps({"runs": await runs.list_runs(timeout=2.0)}))


def route_table(base_url: str) -> list[tuple[Any, ...]]:
    """The extension's routes, under ``base_url``."""
    from bokeh.util.paths import bokehjs_path

    root = url_path_join(base_url, "mlcloud")
    name = r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
    return [
        (url_path_join(root, "clusters"), ClustersHandler),
        (url_path_join(root, "clusters", name), ClusterHandler),
        (url_path_join(root, "clusters", name, "resources"), ClusterResourcesHandler),
        (url_path_join(root, "runs"), RunsHandler),
        (url_path_join(root, "runs", r"([0-9a-f]{1,32})", "metrics"), RunMetricsHandler),
        (url_path_join(root, "panels", r"(loss|resources)", name), PanelHandler),
        (url_path_join(root, "bokeh", "static", r"(.*)"), BokehStaticHandler,
         {"path": str(bokehjs_path())}),
    ]
