"""The sidebar's server (the jupyter_server extension, in the root namespace) lists a cluster
whose scheduler and workers run on other hosts (network namespaces), and that cluster's runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.server.handlers import FEEDS_KEY, LISTS_KEY
from tests.multihost.conftest import SharedHosts


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


@pytest.fixture(autouse=True)
def close_live_state(jp_serverapp: Any, jp_asyncio_loop: Any) -> Iterator[None]:
    """The server's clients on the scheduler and its list watcher end with the server."""
    yield
    settings = jp_serverapp.web_app.settings
    jp_asyncio_loop.run_until_complete(settings[LISTS_KEY].close())
    jp_asyncio_loop.run_until_complete(settings[FEEDS_KEY].close())


def _make_fit() -> Any:
    """Three reported steps, made inside a function so that it travels by value (the workers
    need not import this module)."""

    def fit(ctx: Any) -> None:
        for step in range(3):
            ctx.report(loss=1.0 / (step + 1))

    return fit


async def test_the_server_lists_the_remote_cluster_and_its_runs(across: SharedHosts,
                                                                 jp_fetch: Any) -> None:
    # Attached from this notebook: its discovery file is what the sidebar reads.
    with mlc.connect(across.dask.address, name="netns-sidebar") as handle:
        run = mlc.train(_make_fit(), cluster=handle, track=False)
        run.result(timeout=120)

        listed = json.loads((await jp_fetch("mlcloud", "clusters")).body)["clusters"]
        [entry] = [c for c in listed if c["name"] == "netns-sidebar"]
        assert entry["address"] == across.dask.address  # a namespace's address, not loopback
        assert entry["reachable"] is True and entry["workers"] == 2

        runs = json.loads((await jp_fetch("mlcloud", "runs")).body)["runs"]
        [mine] = [r for r in runs if r["run"] == run.id]
        assert mine["cluster"] == "netns-sidebar" and mine["status"] == "finished"
        assert mine["step"] == 3 and mine["last"] == {"loss": pytest.approx(1 / 3)}
