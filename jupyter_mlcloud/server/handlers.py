"""Request handlers: authenticate, call the API, answer JSON. No logic of their own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import tornado.web
import tornado.websocket
from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.base.handlers import APIHandler, AuthenticatedFileHandler, JupyterHandler
from jupyter_server.utils import url_path_join

from .. import panels
from ..cluster import api as clusters
from ..cluster import discovery
from ..cluster import info as cluster_info
from ..panels import endpoint as endpoint_panel
from ..panels import pipeline as pipeline_panel
from ..serving import board
from ..telemetry import fold
from . import feeds

# What the "new cluster" form may send, and the API option each one is.
START_OPTIONS = ("name", "workers", "threads_per_worker", "memory_limit", "gpu", "adapt")
# Where the server's live state lives in the tornado settings (see ``server.install``).
FEEDS_KEY = "mlcloud_feeds"
LISTS_KEY = "mlcloud_lists"
ENDPOINTS_KEY = "mlcloud_endpoints"


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
            raise tornado.web.HTTPError(400, "the request body is not JSON.") from None
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(400, "the request body must be a JSON object.")
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
    """``GET /mlcloud/runs/<id>/metrics``: rank 0's points as columns (the loss panel's data);
    404 when the run is gone, 503 while its scheduler does not answer."""

    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        try:
            points = await _feeds(self).points(run_id)
        except feeds.RunGone as e:
            return self.refuse(404, str(e))
        except feeds.SchedulerUnreachable as e:
            return self.refuse(503, str(e))
        self.finish(json.dumps(fold.metric_columns(points)))


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
    """``GET /mlcloud/panels/loss/<run>[,<run>...]`` (runs overlaid),
    ``/mlcloud/panels/resources/<cluster>`` and ``/mlcloud/panels/endpoint/<cluster>:<name>``:
    the Bokeh panels as pages, for sidebar tabs (a page handler: API handlers forbid scripts).
    Unknown targets get a page that says so."""

    def message(self, status: int, text: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html")
        self.finish(panels.message_page("ML Cloud panel", text))

    @tornado.web.authenticated
    async def get(self, kind: str, target: str) -> None:
        root = url_path_join(self.base_url, "mlcloud")
        if kind == "loss":
            try:
                run_ids = fold.parse_run_ids(target)
            except ValueError as e:
                return self.message(400, str(e))
            metrics, gone = await _feeds(self).panel_metrics(run_ids)
            if len(gone) == len(run_ids):
                return self.message(404, " ".join(gone))
            page = panels.loss_page(run_ids, metrics, root)
        elif kind == "endpoint":
            try:
                cluster, name = board.parse_target(target)
                entry, versions, features = await _board(self).panel(cluster, name)
            except ValueError as e:
                return self.message(400, str(e))
            except board.EndpointUnknown as e:
                return self.message(404, str(e))
            page = endpoint_panel.endpoint_page(cluster, name, versions, root,
                                                details=board.details(entry),
                                                features=features)
        else:
            if discovery.get(target) is None:
                return self.message(404, f"no cluster named {target!r}.")
            page = panels.resources_page(target, root)
        self.set_header("Content-Type", "text/html")
        self.finish(page)


class PipelinePageHandler(JupyterHandler):
    """``GET /mlcloud/panels/pipeline/<mlflow-run-id>``: one pipeline run's step graph as a
    page, for a sidebar tab; a bad or unknown run gets a page that says so."""

    def message(self, status: int, text: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html")
        self.finish(panels.message_page("ML Cloud pipeline", text))

    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        try:
            run = await asyncio.get_running_loop().run_in_executor(None, _pipeline_run, run_id)
        except ValueError as e:
            return self.message(400, str(e))
        except LookupError as e:
            return self.message(404, str(e))
        except Exception as e:  # noqa: BLE001 - MLflow's own errors carry a message
            message = _first_line(getattr(e, "message", None) or str(e) or type(e).__name__)
            return self.message(503, f"the MLflow store did not answer: {message}")
        self.set_header("Content-Type", "text/html")
        self.finish(pipeline_panel.pipeline_page(run))


class BokehStaticHandler(AuthenticatedFileHandler):
    """BokehJS, served by Jupyter itself behind its authentication: no CDN, no extra port."""


class _RegistryHandler(_Handler):
    """Calls into :mod:`jupyter_mlcloud.tracking.registry`, which MLflow is imported for at the
    first request, never when the extension loads."""

    async def registry_call(self, name: str, *args: Any,
                            refusable: bool = False) -> tuple[bool, Any]:
        """``(True, registry.<name>(*args))``, run off the event loop; or ``(False, None)`` once
        the failure is answered: an unknown model or version is a 404, a value of the request
        MLflow refuses (``refusable``: the call carries the request's values) a 400, any other
        failure a 503, each with one sentence, never a traceback."""
        def call() -> Any:
            from ..tracking import registry

            return getattr(registry, name)(*args)

        try:
            return True, await asyncio.get_running_loop().run_in_executor(None, call)
        except ValueError as e:
            self.refuse(404, str(e))
        except Exception as e:  # MLflow's own errors carry a message and an error code
            message = _first_line(getattr(e, "message", None) or str(e) or type(e).__name__)
            if refusable and getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE":
                self.refuse(400, message)
            else:
                self.refuse(503, f"the MLflow store did not answer: {message}")
        return False, None


class ModelsHandler(_RegistryHandler):
    """``GET /mlcloud/models``: every registered model of the tracking store, with its
    versions (newest first), their runs, metrics and aliases."""

    @tornado.web.authenticated
    async def get(self) -> None:
        ok, found = await self.registry_call("models")
        if ok:
            self.finish(json.dumps({"models": found}))


class ModelAliasHandler(_RegistryHandler):
    """``PUT /mlcloud/models/<name>/aliases/<alias>`` with ``{"version": N}``: point the alias
    at that version; answers the model as ``GET /mlcloud/models`` lists it."""

    @tornado.web.authenticated
    async def put(self, name: str, alias: str) -> None:
        version = self.body().get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            return self.refuse(400, f'send {{"version": N}} with N a version number >= 1, got'
                                    f" {version!r}.")
        ok, _ = await self.registry_call("set_alias", name, alias, version, refusable=True)
        if not ok:
            return
        ok, found = await self.registry_call("models")
        if not ok:
            return
        model = next((m for m in found if m.get("name") == name), None)
        if model is None:  # deleted meanwhile
            return self.refuse(404, f"no registered model named {name!r}.")
        self.finish(json.dumps(model))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


class RunsHandler(_Handler):
    """``GET /mlcloud/runs``: every training run on the discovered clusters, newest first."""

    @tornado.web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps({"runs": await _feeds(self).list_runs()}))


class EventsHandler(JupyterHandler, tornado.websocket.WebSocketHandler):
    """``/mlcloud/events`` (websocket): ``{"clusters": [...], "runs": [...]}`` as
    ``GET /mlcloud/clusters`` and ``/runs`` answer them, once on connect and again whenever
    either list changes."""

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        result = super().get(*args, **kwargs)
        if result is not None:
            await result

    def open(self, *args: str, **kwargs: str) -> None:
        _lists(self).subscribe(self.send_lists)

    def send_lists(self, lists: dict[str, Any]) -> None:
        self.write_message(json.dumps(lists))  # raises once closed: the watcher drops us

    def on_close(self) -> None:
        _lists(self).unsubscribe(self.send_lists)


class _EndpointHandler(_Handler):
    """Answers what :class:`~jupyter_mlcloud.serving.board.Board` gives, or its failure: an
    unknown cluster or endpoint is a 404, a value the API refuses a 400, a scheduler that does
    not answer (or an endpoint held by another change too long) a 503, each with one sentence.
    """

    async def answer(self, pending: Any) -> None:
        try:
            found = await pending
        except board.EndpointUnknown as e:
            return self.refuse(404, str(e))
        except ValueError as e:
            return self.refuse(400, str(e))
        except (board.SchedulerSilent, TimeoutError) as e:
            return self.refuse(503, str(e))
        self.finish(json.dumps(found))


class EndpointsHandler(_EndpointHandler):
    """``GET /mlcloud/endpoints``: every endpoint on every discovered cluster: its URL,
    versions with weights, replicas and their workers, autoscale bounds and live figures;
    those of a scheduler that does not answer as last seen, marked unreachable."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(_board(self).list_endpoints())


class EndpointScaleHandler(_EndpointHandler):
    """``POST /mlcloud/endpoints/<cluster>/<name>/scale`` with ``{"replicas": N}``: run N
    replicas of the endpoint's main version; answers the endpoint as listed."""

    @tornado.web.authenticated
    async def post(self, cluster: str, name: str) -> None:
        change = self.body()
        if set(change) != {"replicas"}:
            return self.refuse(400, 'send {"replicas": N}.')
        await self.answer(_board(self).scale(cluster, name, change["replicas"]))


class EndpointActionHandler(_EndpointHandler):
    """``POST /mlcloud/endpoints/<cluster>/<name>/promote`` (all traffic to the newest version)
    and ``.../rollback`` (back to the previous one); answers the endpoint as listed."""

    def initialize(self, action: str) -> None:
        self.action = action

    @tornado.web.authenticated
    async def post(self, cluster: str, name: str) -> None:
        await self.answer(getattr(_board(self), self.action)(cluster, name))


class EndpointStatsHandler(_EndpointHandler):
    """``GET /mlcloud/endpoints/<cluster>/<name>/stats``: the endpoint's requests per second,
    p50/p99 latency, requests and errors over time, in total and per version, as columns (the
    endpoint panel's data)."""

    @tornado.web.authenticated
    async def get(self, cluster: str, name: str) -> None:
        await self.answer(_board(self).stats(cluster, name))


class _StoreHandler(_Handler):
    """Answers a listing read from the MLflow store in force (MLflow is imported by the first
    request, never when the extension loads): a malformed value of the request is a 400, an
    unknown one a 404, a store that does not answer a 503, each with one sentence."""

    async def answer(self, fn: Any, *args: Any) -> None:
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except ValueError as e:
            return self.refuse(400, str(e))
        except LookupError as e:
            return self.refuse(404, str(e))
        except Exception as e:  # noqa: BLE001 - MLflow's own errors carry a message
            message = _first_line(getattr(e, "message", None) or str(e) or type(e).__name__)
            return self.refuse(503, f"the MLflow store did not answer: {message}")
        self.finish(json.dumps(found))

    def count_argument(self, name: str, default: int) -> int | None:
        """The query argument ``name`` as a whole number from 1 to 100 (None: refused)."""
        text = self.get_argument(name, str(default))
        if not text.isdigit() or not 1 <= int(text) <= 100:
            self.refuse(400, f"{name} must be a whole number from 1 to 100, got {text!r}.")
            return None
        return int(text)


def _studies(max_studies: int) -> dict[str, Any]:
    from ..tuning import record

    return {"studies": record.studies(max_studies)}


def _study(run_id: str) -> dict[str, Any]:
    from ..tuning import record

    return record.study(run_id)


def _pipelines(max_runs: int) -> dict[str, Any]:
    from ..pipelines import record

    return {"pipelines": record.runs(max_runs=max_runs)}


def _pipeline_run(run_id: str) -> dict[str, Any]:
    from ..pipelines import record

    return record.run_graph(run_id)


class PipelinesHandler(_StoreHandler):
    """``GET /mlcloud/pipelines[?max_runs=N]``: the pipelines of the tracking store with their
    last runs, each step's state (pending, running, done, cached, skipped, failed, not-run)
    and duration."""

    @tornado.web.authenticated
    async def get(self) -> None:
        limit = self.count_argument("max_runs", 5)
        if limit is not None:
            await self.answer(_pipelines, limit)


class PipelineRunHandler(_StoreHandler):
    """``GET /mlcloud/pipelines/runs/<mlflow-run-id>``: one pipeline run with its step graph
    (each step's dependencies and depth, and the edges)."""

    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        await self.answer(_pipeline_run, run_id)


class StudiesHandler(_StoreHandler):
    """``GET /mlcloud/studies[?max=N]``: the newest tuning studies of the tracking store, with
    their trials counted by state, the best value so far, direction, metric and cost."""

    @tornado.web.authenticated
    async def get(self) -> None:
        limit = self.count_argument("max", 20)
        if limit is not None:
            await self.answer(_studies, limit)


class StudyHandler(_StoreHandler):
    """``GET /mlcloud/studies/<mlflow-run-id>``: one study as listed, with its trials (MLflow
    and training run ids, params, value, state)."""

    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        await self.answer(_study, run_id)


def _board(handler: Any) -> board.Board:
    return handler.settings[ENDPOINTS_KEY]  # type: ignore[no-any-return]


def _feeds(handler: Any) -> feeds.Feeds:
    return handler.settings[FEEDS_KEY]  # type: ignore[no-any-return]


def _lists(handler: Any) -> feeds.ListWatcher:
    return handler.settings[LISTS_KEY]  # type: ignore[no-any-return]


def route_table(base_url: str) -> list[tuple[Any, ...]]:
    """The extension's routes, under ``base_url``."""
    from bokeh.util.paths import bokehjs_path

    root = url_path_join(base_url, "mlcloud")
    name = r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
    # a cluster, run ids joined by commas, or CLUSTER:ENDPOINT
    target = r"([A-Za-z0-9][A-Za-z0-9_.,:%-]{0,600})"
    part = r"([^/]{1,256})"  # a model or alias name (percent-decoded by tornado)
    endpoint = url_path_join(root, "endpoints", name, r"([A-Za-z0-9][A-Za-z0-9_.-]{0,127})")
    return [
        (url_path_join(root, "clusters"), ClustersHandler),
        (url_path_join(root, "clusters", name), ClusterHandler),
        (url_path_join(root, "clusters", name, "resources"), ClusterResourcesHandler),
        (url_path_join(root, "runs"), RunsHandler),
        (url_path_join(root, "models"), ModelsHandler),
        (url_path_join(root, "models", part, "aliases", part), ModelAliasHandler),
        (url_path_join(root, "events"), EventsHandler),
        (url_path_join(root, "runs", r"([0-9a-f]{1,32})", "metrics"), RunMetricsHandler),
        (url_path_join(root, "studies"), StudiesHandler),
        (url_path_join(root, "studies", part), StudyHandler),
        (url_path_join(root, "pipelines"), PipelinesHandler),
        (url_path_join(root, "pipelines", "runs", part), PipelineRunHandler),
        (url_path_join(root, "panels", "pipeline", part), PipelinePageHandler),
        (url_path_join(root, "endpoints"), EndpointsHandler),
        (url_path_join(endpoint, "scale"), EndpointScaleHandler),
        (url_path_join(endpoint, "promote"), EndpointActionHandler, {"action": "promote"}),
        (url_path_join(endpoint, "rollback"), EndpointActionHandler, {"action": "rollback"}),
        (url_path_join(endpoint, "stats"), EndpointStatsHandler),
        (url_path_join(root, "panels", r"(loss|resources|endpoint)", target), PanelHandler),
        (url_path_join(root, "bokeh", "static", r"(.*)"), BokehStaticHandler,
         {"path": str(bokehjs_path())}),
    ]
