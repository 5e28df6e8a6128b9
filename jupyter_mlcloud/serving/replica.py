"""The ASGI app of one replica: Open Inference Protocol v2 REST (JSON and Triton's binary
tensors), KServe's v1 ``:predict``, health, metadata and Prometheus metrics, for one model
at one version.

Every route but ``/v2/health/live`` and ``/v2/health/ready`` needs the bearer token. Errors
are JSON ``{"error": "<one sentence>"}`` (the protocol's error shape) with their status: 400
for what the request got wrong (naming what was expected), 401 without the token, 404 for
another model or version, 413 past the body limit, 503 with Retry-After when overloaded, 500
for anything else; never a stack trace.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import protocol
from .batching import Batcher, Closed, Overloaded, Timings
from .metrics import ReplicaMetrics
from .protocol import BadRequest, TensorSpec
from .security import bearer_matches

log = logging.getLogger(__name__)

#: Paths that answer without the token (load balancers and orchestrators probe them).
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: Headers of every answered infer: the version that answered and the rows of its batch
#: (the router's per-version figures come from them).
VERSION_HEADER = "x-mlcloud-model-version"
BATCH_HEADER = "x-mlcloud-batch-size"
#: Every answered infer names its request, for labels sent back later (``ep.feedback``): the
#: request's own OIP ``id`` when it gave one, else a fresh one.
REQUEST_ID_HEADER = "x-request-id"


def _answer_headers(version: str, timings: Timings, request_id: str) -> dict[str, str]:
    return {VERSION_HEADER: version, BATCH_HEADER: str(timings.batch_size),
            REQUEST_ID_HEADER: request_id}


#: Told each answered infer: its request id, input rows and outputs (the monitor's window).
Observer = Callable[[str, np.ndarray, np.ndarray], None]


class Model(Protocol):
    """What the app serves: tensor metadata and a batch function (see ``runner``)."""

    input: TensorSpec
    output: TensorSpec
    input_dtype: np.dtype

    def __call__(self, rows: np.ndarray) -> np.ndarray: ...


class Problem(Exception):
    """An error answer: its status, sentence and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BearerAuth:
    """ASGI middleware: 401 for any HTTP request without the bearer token, but the open
    health paths. Outermost, so unknown paths are refused the same way as known ones."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            authorization = None
            for key, value in scope["headers"]:
                if key == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            if not bearer_matches(authorization, self.token):
                response = _error(401, "this endpoint needs its bearer token: send the header"
                                  " 'Authorization: Bearer <token>'.",
                                  {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


#: The hot path, answered on ASGI directly (see the apps' ``*_fast`` handlers).
INFER_PATH = re.compile(r"^/v2/models/[^/]+/infer$")
HEADER_LENGTH_KEY = protocol.HEADER_LENGTH.lower().encode("latin-1")


def with_fast_infer(app: ASGIApp, infer: ASGIApp) -> ASGIApp:
    """``app``, but ``POST /v2/models/{name}/infer`` (:data:`INFER_PATH`) goes to ``infer``."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" \
                and INFER_PATH.match(scope["path"]):
            await infer(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


async def send_answer(send: Send, status: int, headers: dict[str, str], body: bytes) -> None:
    """Send a whole HTTP answer on ASGI (its Content-Length from ``body``)."""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
           if k.lower() != "content-length"]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, headers: dict[str, str] | None = None
                ) -> tuple[bytes, dict[str, str]]:
    """An error answer's JSON body and headers (what :func:`_error` sends)."""
    return (json.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")).encode(),
            {"content-type": "application/json", **(headers or {})})


def _too_big(limit: int) -> Problem:
    return Problem(413, f"the request body is larger than this endpoint's limit of {limit}"
                   " bytes; send fewer rows per request.")


async def receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """An ASGI request's body, refused with 413 as soon as it is known to exceed ``limit``
    bytes (by its Content-Length ``declared``, or while it streams in)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_big(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Problem(400, "the client went away before sending the whole body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes
    (by its Content-Length, or while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_big(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(model: Model, batcher: Batcher, metrics: ReplicaMetrics, *, name: str,
              version: str, token: str, max_body_bytes: int,
              observe: Observer | None = None) -> ASGIApp:
    """The replica's ASGI app serving ``model`` as ``name`` at ``version`` through
    ``batcher``, counting in ``metrics`` and telling ``observe`` each answered request; the
    batcher starts and closes with the app."""
    state = {"ready": False}

    def check_model(request: Request) -> None:
        check_names(request.path_params["name"], request.path_params.get("version"))

    def check_names(asked: str, asked_version: str | None) -> None:
        if asked != name:
            raise Problem(404, f"model {asked!r} is not served here; this endpoint serves"
                          f" {name!r}.")
        if asked_version is not None and asked_version != version:
            raise Problem(404, f"version {asked_version!r} of model {name!r} is not served"
                          f" here; this replica serves version {version}.")

    def rows_of(array: np.ndarray, datatype: str | None) -> np.ndarray:
        spec = model.input
        if datatype is not None and datatype != spec.datatype:
            raise Problem(400, f"input {spec.name!r} has datatype {datatype}; the model"
                          f" expects {spec.datatype}.")
        width = spec.shape[1]
        if array.ndim != 2 or (width != -1 and array.shape[1] != width):
            raise Problem(400, f"input {spec.name!r} has shape {list(array.shape)}; the model"
                          f" expects {list(spec.shape)} (rows of"
                          f" {width if width != -1 else 'any number of'} values).")
        return array

    async def run(rows: np.ndarray) -> tuple[np.ndarray, Timings]:
        try:
            return await batcher.submit(rows)
        except Overloaded as e:
            raise Problem(503, str(e), {"Retry-After": str(e.retry_after)}) from None
        except Closed as e:
            raise Problem(503, str(e), {"Retry-After": "1"}) from None
        except Exception as e:
            log.exception("inference failed in model %s version %s", name, version)
            detail = str(e).splitlines()[0] if str(e) else ""
            raise Problem(500, f"the model failed on this request ({type(e).__name__}"
                          f"{': ' + detail if detail else ''}).") from None

    def guarded(counted: bool) -> Callable[[Callable[[Request], Awaitable[Response]]],
                                           Callable[[Request], Awaitable[Response]]]:
        """Turn every failure of a handler into a JSON sentence; count infer requests."""

        def wrap(handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                if counted:
                    metrics.started()
                status = 500
                try:
                    response = await handler(request)
                    status = response.status_code
                    return response
                except Problem as p:
                    status = p.status
                    return _error(p.status, p.message, p.headers)
                except BadRequest as e:
                    status = 400
                    return _error(400, str(e))
                except Exception:
                    log.exception("replica route %s failed", request.url.path)
                    return _error(500, "the replica failed to answer this request; see the"
                                  " worker's log.")
                finally:
                    if counted and status >= 400:
                        metrics.answered(status)

            return endpoint

        return wrap

    @guarded(counted=False)
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    @guarded(counted=False)
    async def ready(request: Request) -> Response:
        if not state["ready"]:
            return _error(503, "the replica is not ready.")
        return JSONResponse({"ready": True})

    @guarded(counted=False)
    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "jupyter_mlcloud", "extensions": ["binary_tensor_data"]})

    @guarded(counted=False)
    async def metadata(request: Request) -> Response:
        check_model(request)
        return JSONResponse({"name": name, "versions": [version], "platform": "pytorch",
                             "inputs": [model.input.as_json()],
                             "outputs": [model.output.as_json()]})

    @guarded(counted=False)
    async def model_ready(request: Request) -> Response:
        check_model(request)
        return JSONResponse({"name": name, "ready": state["ready"]})

    async def answer_infer(body: bytes, header_length: str | None, started: float
                           ) -> tuple[bytes, dict[str, str]]:
        """An OIP infer request's answer (its body and headers), counted; Problem or
        BadRequest for a request it refuses."""
        decoded = protocol.decode_infer(body, header_length)
        if len(decoded.inputs) != 1 or model.input.name not in decoded.inputs:
            given = ", ".join(repr(n) for n in decoded.inputs)
            raise Problem(400, f"the request gives input(s) {given}; the model takes one"
                          f" input, {model.input.name!r}.")
        datatype, array = decoded.inputs[model.input.name]
        rows = rows_of(array, datatype)
        outputs, timings = await run(rows)
        request_id = decoded.id or uuid.uuid4().hex
        payload, headers = protocol.encode_infer(name, version, request_id,
                                                 [(model.output.name, outputs)], decoded)
        if observe is not None:
            observe(request_id, rows, outputs)
        metrics.answered(200, timings, time.perf_counter() - started)
        return payload, {**headers, **_answer_headers(version, timings, request_id)}

    @guarded(counted=True)
    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        check_model(request)
        body = await read_body(request, max_body_bytes)
        payload, headers = await answer_infer(
            body, request.headers.get(protocol.HEADER_LENGTH), started)
        return Response(payload, headers=headers)

    async def infer_fast(scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v2/models/{name}/infer``, the hot path, straight on ASGI: what
        :func:`infer` answers, without Starlette's request, routing and response objects."""
        started = time.perf_counter()
        metrics.started()
        declared = header_length = None
        for key, value in scope["headers"]:  # ASGI gives names in lower case
            if key == b"content-length":
                declared = value
            elif key == HEADER_LENGTH_KEY:
                header_length = value.decode("latin-1")
        try:
            check_names(scope["path"].split("/")[3], None)
            body = await receive_body(receive, declared, max_body_bytes)
            payload, headers = await answer_infer(body, header_length, started)
            status = 200
        except (Problem, BadRequest) as e:
            status = e.status if isinstance(e, Problem) else 400
            payload, headers = error_body(e.message if isinstance(e, Problem) else str(e),
                                           e.headers if isinstance(e, Problem) else None)
        except Exception:
            log.exception("replica route %s failed", scope["path"])
            status = 500
            payload, headers = error_body("the replica failed to answer this request; see"
                                           " the worker's log.")
        if status >= 400:
            metrics.answered(status)
        await send_answer(send, status, headers, payload)

    @guarded(counted=True)
    async def predict_v1(request: Request) -> Response:
        started = time.perf_counter()
        check_model(request)
        body = await read_body(request, max_body_bytes)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise Problem(400, f"the request body is not valid JSON ({e}).") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
            raise Problem(400, "the request body must be an object with an 'instances' list.")
        try:
            array = np.asarray(doc["instances"], dtype=model.input_dtype)
        except (ValueError, TypeError, OverflowError):
            raise Problem(400, f"'instances' must be rows of numbers; the model expects"
                          f" {list(model.input.shape)}.") from None
        rows = rows_of(array, None)
        outputs, timings = await run(rows)
        request_id = uuid.uuid4().hex
        response = JSONResponse({"predictions": outputs.tolist(), "model_name": name,
                                 "model_version": version, "id": request_id},
                                headers=_answer_headers(version, timings, request_id))
        if observe is not None:
            observe(request_id, rows, outputs)
        metrics.answered(200, timings, time.perf_counter() - started)
        return response

    @guarded(counted=False)
    async def prometheus(request: Request) -> Response:
        data, content_type = metrics.render()
        return Response(data, headers={"content-type": content_type})

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return _error(exc.status_code, f"{request.method} {request.url.path} is not a"
                          f" route of this endpoint ({exc.detail}).")
        return _error(500, "the replica failed to answer this request.")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.close()

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{name}", metadata),
        Route("/v2/models/{name}/versions/{version}", metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v1/models/{name}:predict", predict_v1, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    return BearerAuth(with_fast_infer(app, infer_fast), token)
