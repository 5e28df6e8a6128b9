"""The sidebar's Models section and the MLflow UI in a real JupyterLab, in real headless
Chromium, over a real MLflow SQLite store: the one the Jupyter server is started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import held_cluster
from tests.conftest import wait_for
from tests.ui.conftest import ARTIFACTS, Lab, iframe_of, open_sidebar

EXPERIMENT = "from-the-test"


@pytest.fixture(autouse=True)
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An ``MlflowClient`` on a fresh store, named in the environment before JupyterLab starts
    (autouse: before the ``lab`` fixture), with ``digits`` v1 and v2 registered in it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT)
    client.create_registered_model("digits")
    for loss in (0.5, 0.25):
        run = client.create_run(experiment, run_name=f"digits-loss-{loss}").info.run_id
        client.log_metric(run, "loss", loss)
        client.create_model_version("digits", f"runs:/{run}/model", run)
    return client


def _mlflow_frame(page: Any, ending: str) -> Any:
    """The MLflow tab's document, once it shows the page whose URL ends with ``ending``."""
    page.wait_for_function(
        """ending => document.querySelector('.jp-mlcloud-mlflow iframe')
             ?.contentWindow?.location.href.endsWith(ending)""", arg=ending)
    return iframe_of(page, ".jp-mlcloud-mlflow iframe")


def _aliases(client: Any, name: str) -> dict[str, int]:
    return {alias: int(version)
            for alias, version in client.get_registered_model(name).aliases.items()}


def test_models_section_sets_aliases_and_opens_the_mlflow_ui(lab: Lab, page: Any,
                                                              client: Any) -> None:
    page.goto(f"{lab.url}/lab?token={lab.token}")
    open_sidebar(page)
    sidebar = page.locator("#mlcloud-sidebar")
    model = sidebar.locator('.jp-mlcloud-model[data-model-name="digits"]')
    model.wait_for(timeout=60_000)
    rows = model.locator(".jp-mlcloud-model-version")
    assert [rows.nth(i).get_attribute("data-version") for i in range(rows.count())] == ["2", "1"]
    first, second = (model.locator(f'.jp-mlcloud-model-version[data-version="{v}"]')
                     for v in (1, 2))
    assert "loss 0.2500" in second.inner_text() and "loss 0.5000" in first.inner_text()

    # One click makes version 1 the champion, in MLflow's registry.
    first.locator(".jp-mlcloud-make-champion").click()
    first.locator(".jp-mlcloud-alias", has_text="@champion").wait_for()
    assert _aliases(client, "digits") == {"champion": 1}
    assert first.locator(".jp-mlcloud-make-champion").count() == 0  # it is the champion now
    assert "@champion v1" in model.locator(".jp-mlcloud-model-aliases").inner_text()

    # Any other alias through the box; then the champion moves to version 2.
    second.locator(".jp-mlcloud-alias-name").fill("challenger")
    second.locator(".jp-mlcloud-set-alias").click()
    second.locator(".jp-mlcloud-alias", has_text="@challenger").wait_for()
    assert _aliases(client, "digits") == {"champion": 1, "challenger": 2}
    second.locator(".jp-mlcloud-make-champion").click()
    second.locator(".jp-mlcloud-alias", has_text="@champion").wait_for()
    wait_for(lambda: _aliases(client, "digits") == {"champion": 2, "challenger": 2},
             what="the champion to move to version 2")
    assert first.locator(".jp-mlcloud-make-champion").count() == 1
    page.screenshot(path=str(ARTIFACTS / "sidebar-models.png"))

    # An alias MLflow refuses gets its one sentence, and nothing changes.
    second.locator(".jp-mlcloud-alias-name").fill("v1")
    second.locator(".jp-mlcloud-set-alias").click()
    page.get_by_text("alias name 'v1' is reserved").wait_for()
    assert _aliases(client, "digits") == {"champion": 2, "challenger": 2}

    # A model registered elsewhere (a notebook, a script) shows up by itself.
    client.create_registered_model("air-quality")
    sidebar.locator('.jp-mlcloud-model[data-model-name="air-quality"]').wait_for(timeout=30_000)

    # "Open MLflow": MLflow's own UI in a tab, its data fetched through Jupyter's proxy.
    sidebar.locator(".jp-mlcloud-open-mlflow").click()
    frame = _mlflow_frame(page, "/mlflow/")
    assert frame.url == f"{lab.url}/mlflow/"
    frame.get_by_text(EXPERIMENT).first.wait_for(timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow-tab.png"))
    # A version's link shows that version's page in the same tab.
    first.locator(".jp-mlcloud-version-link").click()
    frame = _mlflow_frame(page, "/mlflow/#/models/digits/versions/1")
    frame.get_by_text("digits-loss-0.5").first.wait_for(timeout=60_000)  # its source run
    assert page.locator(".jp-mlcloud-mlflow").count() == 1


def test_a_tracked_run_links_to_its_mlflow_run(lab: Lab, page: Any, client: Any) -> None:
    # A run trained in another process (as in a notebook kernel), recorded in the same store.
    held = held_cluster.start("tracked-ui", runs=1)
    try:
        [run] = held.runs

        def tracked() -> dict[str, str] | None:
            listed = {r["run"]: r for r in lab.api("GET", "/mlcloud/runs")["runs"]}
            return listed.get(run, {}).get("mlflow")

        mlflow_run = wait_for(tracked, timeout=60, what="the run's 'tracked' event")
        assert isinstance(mlflow_run, dict)
        recorded = client.get_run(mlflow_run["run_id"])  # a real run in the store
        assert recorded.info.experiment_id == mlflow_run["experiment_id"]

        page.goto(f"{lab.url}/lab?token={lab.token}")
        open_sidebar(page)
        row = page.locator(f'#mlcloud-sidebar .jp-mlcloud-run[data-run-id="{run}"]')
        row.wait_for(timeout=60_000)
        assert row.get_attribute("data-run-status") == "finished"  # not overwritten
        link = row.locator(".jp-mlcloud-run-mlflow")
        page_of_run = (f"/mlflow/#/experiments/{mlflow_run['experiment_id']}"
                       f"/runs/{mlflow_run['run_id']}")
        assert link.get_attribute("href") == lab.url + page_of_run
        link.click()
        frame = _mlflow_frame(page, page_of_run)
        frame.get_by_text(recorded.info.run_name).first.wait_for(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-run.png"))
    finally:
        held.close()
