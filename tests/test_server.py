"""The jupyter_server extension through pytest-jupyter's real server and jp_fetch."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError

import jupyter_mlcloud as mlc
from jupyter_mlcloud.server.handlers import route_table


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_mlcloud": True}}}


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
    from jupyter_mlcloud import discovery

    discovery.write(discovery.ClusterRecord(name="gone", kind="remote",
                                            address="tcp://127.0.0.1:9", status="running"))
    response = await jp_fetch("mlcloud", "clusters")
    [entry] = json.loads(response.body)["clusters"]
    assert (entry["name"], entry["reachable"], entry["workers"]) == ("gone", False, None)
    discovery.remove("gone")


@pytest.mark.parametrize("pattern", [p for p, _ in route_table("/")])
async def test_every_route_refuses_unauthenticated_requests(jp_fetch, pattern: str) -> None:
    path = pattern.strip("/").split("/")
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch(*path, headers={"Authorization": ""})
    assert err.value.code == 403
