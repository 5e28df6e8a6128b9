"""The sidebar's Endpoints section in a real JupyterLab, in real headless Chromium, over a real
endpoint (``mlc.serve`` of a small ``torch.nn.Linear``) on a real local cluster: what a card
shows, scaling and rolling back from it as the kernel's ``Endpoint`` sees it, and the live
endpoint panel in a tab."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

import jupyter_mlcloud as mlc
from tests.conftest import wait_for
from tests.ui.conftest import ARTIFACTS, Lab, bokeh_model, iframe_of, open_sidebar

X = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
CARD = '#mlcloud-sidebar .jp-mlcloud-endpoint[data-endpoint-name="digits"]'


def linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def _card_shows(page: Any, attribute: str, value: str) -> None:
    """Until the endpoint's card has ``data-<attribute>`` equal to ``value``."""
    page.wait_for_function(
        "([card, key, value]) => document.querySelector(card)?.dataset[key] === value",
        arg=[CARD, attribute, value], timeout=60_000)


def _served(ep: Any) -> list[tuple[int, float, int]]:
    return [(v["version"], v["weight"], v["replicas"]) for v in ep.versions]


def test_endpoints_section_scales_rolls_back_and_opens_the_panel(lab: Lab, page: Any) -> None:
    with mlc.up(workers=2, name="serving-ui") as cluster:
        ep = mlc.serve(linear(0), name="digits", cluster=cluster, replicas=1)
        try:
            for _ in range(5):
                ep.predict(X)
            page.goto(f"{lab.url}/lab?token={lab.token}")
            open_sidebar(page)
            card = page.locator(CARD)
            card.wait_for(timeout=60_000)
            assert card.locator(".jp-mlcloud-endpoint-url").inner_text() == ep.url
            assert "on serving-ui" in card.locator(".jp-mlcloud-endpoint-title").inner_text()
            assert card.get_attribute("data-versions") == "1:1"
            version = card.locator('.jp-mlcloud-endpoint-version[data-version="1"]')
            assert "v1 100% · 1 replica" in version.inner_text()
            # The router's figures of the five requests (the list refreshes every 3 s).
            page.wait_for_function(
                "card => /^rps \\d+\\.\\d · p50 \\d+\\.\\d ms · p99 \\d+\\.\\d ms · errors 0$/"
                ".test(document.querySelector(card + ' .jp-mlcloud-endpoint-figures')"
                "?.textContent ?? '')", arg=CARD, timeout=60_000)
            assert card.locator(".jp-mlcloud-endpoint-promote").count() == 0  # one version

            # Scale to two replicas from the card: the kernel's handle sees them.
            card.locator(".jp-mlcloud-endpoint-replicas-to").fill("2")
            card.locator(".jp-mlcloud-endpoint-scale").click()
            _card_shows(page, "replicas", "2")
            assert len(ep.replicas) == 2 and _served(ep) == [(1, 1.0, 2)]
            assert "2 replicas on 2 workers" in card.locator(
                ".jp-mlcloud-endpoint-replicas").inner_text()

            # A canary from the notebook side shows up by itself; roll it back from the card.
            ep.update(linear(1), canary=0.5, replicas=1)
            _card_shows(page, "versions", "1:0.5,2:0.5")
            assert "v2 50% · 1 replica" in card.locator(
                '.jp-mlcloud-endpoint-version[data-version="2"]').inner_text()
            page.screenshot(path=str(ARTIFACTS / "sidebar-endpoints.png"))
            card.locator(".jp-mlcloud-endpoint-rollback").click()
            page.get_by_text("Rolling digits back: done.").wait_for(timeout=60_000)
            _card_shows(page, "versions", "1:1")
            wait_for(lambda: _served(ep) == [(1, 1.0, 2)], what="the rollback in the kernel")

            # The live panel, in a tab: figures over time, filled from the server.
            card.locator(".jp-mlcloud-open-endpoint").click()
            frame = iframe_of(page, ".jp-mlcloud-panel iframe")
            assert "/mlcloud/panels/endpoint/" in frame.url
            for _ in range(3):
                ep.predict(X)
            frame.wait_for_function(bokeh_model(
                "endpoint-stats", "m.data.time.length >= 2 &&"
                " m.data.requests[m.data.requests.length - 1] >= 8"), timeout=60_000)
            # p50 and p99 for each version the page plots: the versions sampled while the
            # endpoint ran (v2 too, if a sample fell in its few seconds; the page reloads
            # when its source brings a version it does not plot).
            frame.wait_for_function(bokeh_model(
                "figure-latency",
                "(() => { const s = Bokeh.documents[0].get_model_by_name('endpoint-stats');"
                " const n = Object.keys(s.data).filter(k => /^v.+_requests$/.test(k)).length;"
                " return n >= 1 && m.renderers.length === 2 * n; })()"), timeout=60_000)
            assert frame.evaluate(bokeh_model("notice", "!m.visible"))
            assert ep.url in frame.evaluate(
                "() => Bokeh.documents[0].get_model_by_name('details').text")
            page.screenshot(path=str(ARTIFACTS / "endpoint-panel.png"))

            # Closed from the notebook side: the card goes, the panel says why.
            ep.close()
            page.wait_for_function(f"() => !document.querySelector({json.dumps(CARD)})",
                                   timeout=60_000)
            frame.wait_for_function(bokeh_model(
                "notice", "m.visible && m.text.includes('no endpoint')"), timeout=30_000)
        finally:
            ep.close()
