"""Workers that are told to go retire gracefully, so the scheduler records their departure as
expected, not as a crash: on SIGTERM (as a spot or preemptible VM is before it is taken away),
and on a cloud's preemption notice when the Dask config ``mlcloud.preemption.notice`` names one.

A run reads that record (:func:`departed_as_planned`) and treats such a loss as a planned move:
it resumes from its last commit on a replacement without using any of ``max_failures``.

``mlcloud.preemption.notice`` is ``aws`` (the spot instance-action, IMDSv2), ``gcp`` (the
instance's ``preempted`` flag), ``azure`` (a ``Preempt`` scheduled event) or an http(s) URL of
your own, noticed at its first 200 answer (``{name}`` and ``{host}`` in it become the worker's
name and host). Each worker asks every ``mlcloud.preemption.every`` seconds (default 5); a
metadata service that does not answer is asked again next time. ``mlcloud.preemption.url``
points a cloud's check at another address (a proxy, or a test's server).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

NAME = "mlcloud-graceful-termination"
NOTICE_NAME = "mlcloud-preemption-notice"
CLOUDS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "azure": "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
}
AWS_TOKEN_PATH = "/latest/api/token"
ASK_TIMEOUT_S = 2.0

logger = logging.getLogger(__name__)


class GracefulTermination(WorkerPlugin):
    """On SIGTERM, the worker retires gracefully (``Worker.close_gracefully``) instead of dying
    at once; the signal's earlier handler is put back when the plugin goes."""

    name = NAME

    def __init__(self) -> None:
        self._previous: Any = None

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (a thread-based worker)

        def on_term(signum: int, frame: Any) -> None:
            worker.loop.add_callback(worker.close_gracefully, reason="sigterm")

        self._previous = signal.signal(signal.SIGTERM, on_term)

    def teardown(self, worker: Any) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)


def notice_settings() -> tuple[str, str, float] | None:
    """The preemption notice the Dask config asks for: (cloud or "url", the URL to ask,
    seconds between asks); None if none. ValueError, in one sentence, for a bad value."""
    import dask

    notice = dask.config.get("mlcloud.preemption.notice", None)
    if notice in (None, "", False):
        return None
    every = dask.config.get("mlcloud.preemption.every", 5)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every <= 0:
        raise ValueError(f"mlcloud.preemption.every must be a number of seconds > 0, got"
                         f" {every!r}.")
    if notice in CLOUDS:
        return str(notice), str(dask.config.get("mlcloud.preemption.url", None)
                                or CLOUDS[notice]), float(every)
    if isinstance(notice, str) and notice.startswith(("http://", "https://")):
        return "url", notice, float(every)
    raise ValueError(f"mlcloud.preemption.notice must be one of {', '.join(CLOUDS)} or an"
                     f" http(s) URL, got {notice!r}.")


def noticed(kind: str, code: int, body: bytes) -> bool:
    """Whether a metadata answer (status ``code``, ``body``) is a preemption notice."""
    if code != 200:
        return False  # AWS and your own URL: 404 until the notice
    if kind == "gcp":
        return body.strip().upper() == b"TRUE"
    if kind == "azure":
        try:
            events = json.loads(body or b"{}").get("Events", [])
        except (ValueError, AttributeError):
            return False
        return any(isinstance(e, dict) and e.get("EventType") == "Preempt" for e in events)
    return True


class PreemptionNotice(WorkerPlugin):
    """Asks a cloud's metadata service for a preemption notice every ``every`` seconds; at the
    notice the worker retires gracefully, as on SIGTERM (see the module)."""

    name = NOTICE_NAME

    def __init__(self, kind: str, url: str, every: float) -> None:
        self.kind, self.url, self.every = kind, url, every
        self._callback: Any = None
        self._token: str | None = None  # AWS IMDSv2

    def setup(self, worker: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        url = self.url.replace("{name}", str(worker.name)).replace("{host}", worker.ip)
        self._callback = PeriodicCallback(lambda: self._check(worker, url), self.every * 1000)
        self._callback.start()

    def teardown(self, worker: Any) -> None:
        if self._callback is not None:
            self._callback.stop()

    async def _check(self, worker: Any, url: str) -> None:
        from distributed.core import Status

        if worker.status != Status.running:
            return
        try:
            if not await self.preempted(url):
                return
        except Exception:  # noqa: BLE001 - unreachable now: asked again next time
            return
        self._callback.stop()
        logger.warning("preemption notice for worker %s (%s): retiring gracefully",
                       worker.address, self.kind)
        await worker.close_gracefully(reason="preemption-notice")

    async def preempted(self, url: str) -> bool:
        """Whether the metadata service at ``url`` gives notice now (OSError and the like
        when it does not answer)."""
        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        headers = {"gcp": {"Metadata-Flavor": "Google"}, "azure": {"Metadata": "true"}}.get(
            self.kind, {})
        if self.kind == "aws":
            headers = {"X-aws-ec2-metadata-token": await self._aws_token(url)}
        answer = await AsyncHTTPClient().fetch(HTTPRequest(
            url, headers=headers, request_timeout=ASK_TIMEOUT_S, connect_timeout=ASK_TIMEOUT_S),
            raise_error=False)
        if answer.code == 401 and self.kind == "aws":
            self._token = None  # expired: a new one next time
        return noticed(self.kind, answer.code, answer.body or b"")

    async def _aws_token(self, url: str) -> str:
        from urllib.parse import urlsplit

        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        if self._token is None:
            parts = urlsplit(url)
            answer = await AsyncHTTPClient().fetch(HTTPRequest(
                f"{parts.scheme}://{parts.netloc}{AWS_TOKEN_PATH}", method="PUT", body=b"",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
                request_timeout=ASK_TIMEOUT_S, connect_timeout=ASK_TIMEOUT_S))
            self._token = answer.body.decode()
        return self._token


def install(client: Any, notice: tuple[str, str, float] | None = None) -> None:
    """Register :class:`GracefulTermination` on every worker of ``client``'s cluster, present
    and future (once per client), and :class:`PreemptionNotice` for ``notice`` (see
    :func:`notice_settings`; again when it changes)."""
    if not getattr(client, "_mlcloud_graceful_termination", False):
        client.register_plugin(GracefulTermination(), name=NAME)
        client._mlcloud_graceful_termination = True
    if notice is not None and getattr(client, "_mlcloud_preemption_notice", None) != notice:
        client.register_plugin(PreemptionNotice(*notice), name=NOTICE_NAME)
        client._mlcloud_preemption_notice = notice


def departed_as_planned(client: Any, worker: str) -> bool:
    """Whether the scheduler recorded ``worker``'s departure as expected: retired
    (``Client.retire_workers``, a graceful close after SIGTERM), not lost."""
    try:
        logged = client.get_events(worker)
    except Exception:
        return False
    for _, event in logged:
        if not isinstance(event, dict):
            continue
        if event.get("action") == "retired":
            return True
        if event.get("action") == "remove-worker" and event.get("expected"):
            return True
    return False
