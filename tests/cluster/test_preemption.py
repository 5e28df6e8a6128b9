"""Preemption notices: each cloud's metadata answer read the way the cloud gives it (a real
HTTP server on loopback stands in for the metadata service), and the settings' checks. A run
moving off a noticed worker: tests/train/test_preemption.py."""

from __future__ import annotations

import asyncio

import dask
import pytest

from jupyter_mlcloud.cluster.preemption import PreemptionNotice, notice_settings
from tests.conftest import MetadataServer


@pytest.mark.parametrize(("kind", "path"), [
    ("gcp", "/gcp"), ("azure", "/azure"), ("aws", "/latest/meta-data/spot/instance-action")])
def test_each_clouds_notice_is_read_as_that_cloud_gives_it(
        metadata_server: MetadataServer, kind: str, path: str) -> None:
    with dask.config.set({"mlcloud.preemption.notice": kind,
                          "mlcloud.preemption.url": metadata_server.url + path}):
        settings = notice_settings()
    assert settings == (kind, metadata_server.url + path, 5.0)
    plugin = PreemptionNotice(*settings)
    assert asyncio.run(plugin.preempted(settings[1])) is False
    metadata_server.preempted.add(kind)
    assert asyncio.run(plugin.preempted(settings[1])) is True


def test_a_url_of_ones_own_is_noticed_at_its_first_200(metadata_server: MetadataServer) -> None:
    plugin = PreemptionNotice("url", metadata_server.url + "/notice/{name}", 1.0)
    assert asyncio.run(plugin.preempted(metadata_server.url + "/notice/w1")) is False
    metadata_server.preempted.add("w1")
    assert asyncio.run(plugin.preempted(metadata_server.url + "/notice/w1")) is True


def test_an_unreachable_service_raises_rather_than_noticing() -> None:
    plugin = PreemptionNotice("gcp", "http://127.0.0.1:9/gcp", 1.0)  # discard port: refused
    with pytest.raises(OSError):
        asyncio.run(plugin.preempted("http://127.0.0.1:9/gcp"))


@pytest.mark.parametrize(("config", "message"), [
    ({"mlcloud.preemption.notice": "ibm"},
     "mlcloud.preemption.notice must be one of aws, gcp, azure or an http(s) URL, got 'ibm'."),
    ({"mlcloud.preemption.notice": "gcp", "mlcloud.preemption.every": 0},
     "mlcloud.preemption.every must be a number of seconds > 0, got 0."),
])
def test_bad_settings_are_one_sentence(config: dict[str, object], message: str) -> None:
    with dask.config.set(config), pytest.raises(ValueError) as raised:
        notice_settings()
    assert str(raised.value) == message


def test_no_notice_by_default() -> None:
    assert notice_settings() is None
