"""The jupyter_server extension through pytest-jupyter's real server and jp_fetch."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

import jupyter_mlcloud as mlc
from jupyter_mlcloud.server.handlers import FEEDS_KEY, LISTS_KEY, EventsHandler, route_table
from tests import held_cluster
from tests.conftest import discovery_files, wait_for


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


@pytest.fixture(autouse=True)
def close_live_state(jp_serverapp: Any, jp_asyncio_loop: Any) -> Iterator[None]:
    """The server's clients on schedulers and its list watcher end with the server."""
    yield
    settings = jp_serverapp.web_app.settings
    jp_asyncio_loop.run_until_complete(settings[LISTS_KEY].close())
    jp_asyncio_loop.run_until_complete(settings[FEEDS_KEY].close())


async def until(condition: Callable[[], Awaitable[Any]], timeout: float = 30.0,
                what: str = "") -> Any:
    """Await ``condition()`` until it gives something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.1)


async def status_of(jp_fetch: Any, *path: str) -> tuple[int, Any]:
    """The status and decoded JSON body of a GET (errors included)."""
    try:
        response = await jp_fetch(*path)
    except HTTPClientError as e:
        response = e.response
    return response.code, json.loads(response.body)


async def test_clusters_endpoint_lists_discovered_clusters_with_live_figures(jp_fetch) -> None:
    response = await jp_fetch("mlcloud", "clusters")
    assert json.loads(response.body) == {"clusters": []}

    with mlc.up(workers=2, name="listed") as cluster:
        response = await jp_fetch("mlcloud", "clusters")
        [entry] = json.loads(response.body)["clusters"]
        assert entry["name"] == "listed" and entry["address"] == cluster.address
        assert (entry["workers"], entry["threads"], entry["gpus"]) == (2, 2, 0)
        assert entry["reachable"] is True and entry["dashboard"].startswith("http")

    response = await jp_fetch("mlcloud", "clusters")
    assert json.loads(response.body) == {"clusters": []}


async def test_unreachable_scheduler_is_listed_as_unreachable(jp_fetch) -> None:
    from jupyter_mlcloud.cluster import discovery

    discovery.write(discovery.ClusterRecord(name="gone", kind="remote",
                                            address="tcp://127.0.0.1:9", status="running"))
    response = await jp_fetch("mlcloud", "clusters")
    [entry] = json.loads(response.body)["clusters"]
    assert (entry["name"], entry["reachable"], entry["workers"]) == ("gone", False, None)
    discovery.remove("gone")


SAMPLES = ("loss", "0123abcd", "some-cluster", "js/bokeh.min.js")
SOCKETS = [route[0] for route in route_table("/") if route[1] is EventsHandler]


def _sample_path(pattern: str) -> list[str]:
    """A concrete URL for a route pattern: each regex group becomes a value it matches."""

    def value(group: re.Match) -> str:
        return next(s for s in SAMPLES if re.fullmatch(group.group(0), s))

    return re.sub(r"\([^)]*\)", value, pattern).strip("/").split("/")


ROUTES = [route[0] for route in route_table("/")]


@pytest.mark.parametrize("pattern", ROUTES)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_every_route_refuses_unauthenticated_requests(jp_fetch, pattern: str,
                                                            method: str) -> None:
    body = "{}" if method in ("POST", "PUT", "PATCH") else None
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch(*_sample_path(pattern), method=method, body=body,
                       headers={"Authorization": ""}, follow_redirects=False)
    # 403 (API routes) or a redirect to the login page (pages); 405: no such method at all.
    assert err.value.code in (302, 403, 405)
    if err.value.code == 302:
        assert "login" in err.value.response.headers["Location"]
    assert discovery_files() == []


@pytest.mark.parametrize("pattern", SOCKETS)
async def test_the_event_socket_refuses_unauthenticated_connections(jp_ws_fetch,
                                                                     pattern: str) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_ws_fetch(*_sample_path(pattern), headers={"Authorization": ""})
    assert err.value.code == 403


async def test_the_walk_covers_every_registered_mlcloud_route(jp_serverapp) -> None:
    registered = {
        rule.matcher.regex.pattern.rstrip("$")
        for rule in jp_serverapp.web_app.default_router.rules[0].target.rules
        if "mlcloud" in rule.matcher.regex.pattern
    }
    expected = {route[0] for route in route_table(jp_serverapp.base_url)}
    assert registered == expected  # so the auth walk above tries every route there is


async def test_start_scale_adapt_and_shut_down_through_rest(jp_fetch) -> None:
    created = await jp_fetch("mlcloud", "clusters", method="POST",
                             body=json.dumps({"name": "from-sidebar", "workers": 1, "gpu": False}))
    assert created.code == 201 and json.loads(created.body)["workers"] == 1
    [entry] = json.loads((await jp_fetch("mlcloud", "clusters")).body)["clusters"]
    assert entry["name"] == "from-sidebar" and entry["owner"] == "jupyter-server"

    await jp_fetch("mlcloud", "clusters", "from-sidebar", method="PATCH",
                   body=json.dumps({"workers": 2}))
    handle = mlc.get("from-sidebar")
    wait_for(lambda: handle.info()["workers"] == 2, what="2 workers")
    await jp_fetch("mlcloud", "clusters", "from-sidebar", method="PATCH",
                   body=json.dumps({"adapt": [1, 3]}))
    assert handle.cluster._adaptive.maximum == 3

    deleted = await jp_fetch("mlcloud", "clusters", "from-sidebar", method="DELETE")
    assert deleted.code == 204 and handle.closed and discovery_files() == []


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", ["clusters"], {"workers": 0}, "workers must be an integer >= 1, got 0"),
        ("POST", ["clusters"], {"nodes": 2}, "unknown options \\['nodes'\\]"),
        ("POST", ["clusters"], {"adapt": "4:1"}, "adapt must be MIN:MAX"),
        ("PATCH", ["clusters", "ghost"], {"workers": 2}, "no cluster named 'ghost'"),
        ("PATCH", ["clusters", "ghost"], {"size": 2}, "send {\"workers\": N}"),
        ("DELETE", ["clusters", "ghost"], None, "no cluster named 'ghost'"),
    ],
)
async def test_bad_requests_get_one_sentence(jp_fetch, method: str, path: list[str],
                                             body: dict | None, message: str) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("mlcloud", *path, method=method,
                       body=None if body is None else json.dumps(body))
    assert err.value.code == 400
    assert re.search(message, json.loads(err.value.response.body)["message"])
    assert discovery_files() == []


async def test_runs_are_read_from_the_cluster_event_topics(jp_fetch) -> None:
    with mlc.up(workers=1, name="with-runs") as cluster:
        def fn(ctx):
            for step in range(3):
                ctx.report(loss=1.0 / (step + 1))

        run = mlc.train(fn, cluster=cluster)
        run.result(timeout=120)
        [entry] = json.loads((await jp_fetch("mlcloud", "runs")).body)["runs"]
        assert entry["run"] == run.id and entry["status"] == "finished"
        assert entry["cluster"] == "with-runs" and entry["step"] == 3
        assert entry["points"] == 3 and entry["last"] == {"loss": pytest.approx(1 / 3)}


async def test_loss_panel_data_page_and_bokehjs(jp_fetch) -> None:
    with mlc.up(workers=2, name="panels") as cluster:
        def fn(ctx):
            for step in range(4):
                ctx.report(loss=1.0 / (step + 1), accuracy=step / 4)

        run = mlc.train(fn, cluster=cluster)
        run.result(timeout=120)
        columns = json.loads((await jp_fetch("mlcloud", "runs", run.id, "metrics")).body)
        assert columns["step"] == [1, 2, 3, 4]
        assert columns["loss"] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
        assert columns["accuracy"] == pytest.approx([0, 0.25, 0.5, 0.75])

        page = (await jp_fetch("mlcloud", "panels", "loss", run.id)).body.decode()
        assert "ColumnDataSource" in page and f"mlcloud/runs/{run.id}/metrics" in page
        assert "document_ready" in page and "figure-accuracy" in page  # the poller, a plot
        assert "mlcloud/bokeh/static/js/bokeh.min.js" in page and "cdn.bokeh" not in page
        script = await jp_fetch("mlcloud", "bokeh", "static", "js", "bokeh.min.js")
        assert script.code == 200 and b"Bokeh" in script.body[:2000]

        resources = json.loads((await jp_fetch("mlcloud", "clusters", "panels",
                                               "resources")).body)
        assert len(resources["worker"]) == 2 and all(c >= 0 for c in resources["cpu"])
        assert resources["gpu_util"] == [0.0, 0.0]  # no GPU here: zero rows, no error
        page = (await jp_fetch("mlcloud", "panels", "resources", "panels")).body.decode()
        assert "mlcloud/clusters/panels/resources" in page


@pytest.mark.parametrize("path", [["runs", "0123abcd", "metrics"],
                                  ["clusters", "ghost", "resources"]])
async def test_data_for_things_that_do_not_exist_say_so(jp_fetch, path: list[str]) -> None:
    code, body = await status_of(jp_fetch, "mlcloud", *path)
    assert code == 404 and body["message"].startswith("no ")


@pytest.mark.parametrize(("path", "code", "message"), [
    (["loss", "0123abcd"], 404, "no run &#x27;0123abcd&#x27; on any discovered cluster."),
    (["loss", "0123abcd,beef"], 404, "no run &#x27;beef&#x27; on any discovered cluster."),
    (["loss", "0123,zz"], 400, "&#x27;zz&#x27; is not a run id"),
    (["resources", "ghost"], 404, "no cluster named &#x27;ghost&#x27;."),
])
async def test_panels_for_things_that_do_not_exist_say_so(jp_fetch, path: list[str], code: int,
                                                          message: str) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("mlcloud", "panels", *path)
    page = err.value.response.body.decode()
    assert err.value.code == code and "mlcloud-panel-message" in page and message in page
    assert "Traceback" not in page


async def test_overlay_page_polls_every_run_and_plots_every_metric(jp_fetch) -> None:
    with mlc.up(workers=1, name="overlay") as cluster:
        def plain(ctx):
            for step in range(3):
                ctx.report(loss=1.0 / (step + 1))

        def compressed(ctx):
            for step in range(3):
                ctx.report(loss=1.0 / (step + 1), bytes_sent=100.0 * step, bytes_ratio=0.5)

        first = mlc.train(plain, cluster=cluster)
        first.result(timeout=120)
        second = mlc.train(compressed, cluster=cluster)
        second.result(timeout=120)
        page = (await jp_fetch("mlcloud", "panels", "loss",
                               f"{first.id},{second.id}")).body.decode()
        for run in (first, second):
            assert f"mlcloud/runs/{run.id}/metrics" in page and f"metrics-{run.id}" in page
        for name in ("figure-loss", "figure-bytes_sent", "figure-bytes_ratio",
                     "figure-steps_per_s"):
            assert name in page
        columns = json.loads((await jp_fetch("mlcloud", "runs", second.id, "metrics")).body)
        assert columns["bytes_sent"] == [0.0, 100.0, 200.0]
        assert columns["steps_per_s"][0] is None and columns["steps_per_s"][2] > 0


async def test_a_silent_scheduler_gets_503_until_it_answers_and_a_gone_run_404(
        jp_fetch) -> None:
    held = held_cluster.start("held", runs=1)
    try:
        [run] = held.runs
        code, columns = await status_of(jp_fetch, "mlcloud", "runs", run, "metrics")
        assert code == 200 and columns["step"] == [1, 2, 3, 4, 5, 6]
        assert columns["bytes_ratio"] == [None, 0.25, 0.25, 0.25, 0.25, 0.25]

        await jp_fetch("mlcloud", "runs")  # the list, as the sidebar saw it last
        held.pause()
        code, body = await until(
            lambda: _with_code(jp_fetch, 503, "mlcloud", "runs", run, "metrics"),
            what="a 503 while the scheduler is stopped")
        assert body["message"] == "the scheduler of cluster 'held' does not answer."
        [listed] = json.loads((await jp_fetch("mlcloud", "runs")).body)["runs"]
        assert listed["run"] == run and listed["reachable"] is False  # as last seen
        held.resume()
        code, columns = await until(
            lambda: _with_code(jp_fetch, 200, "mlcloud", "runs", run, "metrics"),
            what="the points again once the scheduler answers")
        assert columns["step"] == [1, 2, 3, 4, 5, 6]
    finally:
        held.close()
    for _ in range(2):  # every later ask (panel poll, sidebar) hears why, not just the first
        code, body = await status_of(jp_fetch, "mlcloud", "runs", run, "metrics")
        assert code == 404
        assert body["message"] == f"no run '{run}' any more: its cluster 'held' was shut down."


async def _with_code(jp_fetch: Any, code: int, *path: str) -> tuple[int, Any] | None:
    answer = await status_of(jp_fetch, *path)
    return answer if answer[0] == code else None


async def test_event_socket_pushes_cluster_and_run_changes(jp_ws_fetch, jp_serverapp) -> None:
    socket = await jp_ws_fetch("mlcloud", "events")

    async def next_lists(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def read() -> dict[str, Any] | None:
            message = await asyncio.wait_for(socket.read_message(), 30)
            lists = json.loads(message)
            return lists if check(lists) else None
        return await until(read, timeout=60, what="a pushed list")

    assert await next_lists(lambda lists: lists == {"clusters": [], "runs": []})
    with mlc.up(workers=1, name="pushed") as cluster:
        lists = await next_lists(lambda lists: len(lists["clusters"]) == 1)
        assert lists["clusters"][0]["name"] == "pushed"

        def fn(ctx):
            ctx.report(loss=0.5)

        run = mlc.train(fn, cluster=cluster)
        run.result(timeout=120)
        lists = await next_lists(lambda lists: [r["status"] for r in lists["runs"]] == ["finished"])
        assert lists["runs"][0]["run"] == run.id and lists["runs"][0]["last"] == {"loss": 0.5}
    await next_lists(lambda lists: lists["clusters"] == [])
    socket.close()
    watcher = jp_serverapp.web_app.settings[LISTS_KEY]
    await until(lambda: _done(watcher), what="the list watcher to stop with no one listening")


async def _done(watcher: Any) -> bool:
    return watcher._task is None or watcher._task.done()
