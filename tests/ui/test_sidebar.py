"""The ML Cloud sidebar in a real JupyterLab, in real headless Chromium."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from tests import held_cluster
from tests.conftest import wait_for
from tests.pipelines.conftest import nightly
from tests.tuning.conftest import make_study
from tests.ui.conftest import ARTIFACTS, Lab, bokeh_model, iframe_of, open_sidebar

CELL = "%load_ext jupyter_mlcloud\n%mlcloud up --workers 1 --name from-notebook"


def _new_notebook(lab: Lab, name: str) -> None:
    lab.api("PUT", f"/api/contents/{name}", {
        "type": "notebook", "format": "json",
        "content": {"cells": [], "nbformat": 4, "nbformat_minor": 5, "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}},
    })


def _wait_for_workers(page: Any, cluster: str, workers: int) -> None:
    """Until the sidebar's card for ``cluster`` shows ``workers`` workers."""
    page.wait_for_function(
        """([name, n]) => document.querySelector(
             `#mlcloud-sidebar [data-cluster-name="${name}"] .jp-mlcloud-workers b`
           )?.textContent === String(n)""", arg=[cluster, workers], timeout=60_000)


def test_sidebar_lists_a_cluster_started_in_a_notebook(lab: Lab, page: Any) -> None:
    _new_notebook(lab, "demo.ipynb")
    page.goto(f"{lab.url}/lab/tree/demo.ipynb?token={lab.token}")
    open_sidebar(page)
    page.locator("#mlcloud-sidebar .jp-mlcloud-empty").wait_for()
    assert "%mlcloud up" in page.locator("#mlcloud-sidebar .jp-mlcloud-empty").inner_text()

    # Run %mlcloud up in the notebook's kernel, as a user would.
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for()
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.click()
    editor.fill(CELL)
    page.keyboard.press("Shift+Enter")
    try:
        page.locator(".mlcloud-cluster-card").wait_for(timeout=120_000)  # the card in the notebook
    finally:
        page.screenshot(path=str(ARTIFACTS / "notebook-cell.png"))

    card = page.locator('#mlcloud-sidebar .jp-mlcloud-cluster[data-cluster-name="from-notebook"]')
    card.wait_for(timeout=30_000)  # the sidebar polls every 3 s
    page.wait_for_function(
        "() => document.querySelector('#mlcloud-sidebar .jp-mlcloud-workers b')"
        "?.textContent === '1'")
    assert "local-cpu" in card.inner_text()
    assert card.locator("a.jp-mlcloud-dashboard").get_attribute("href").startswith("http")
    page.screenshot(path=str(ARTIFACTS / "sidebar-cluster.png"))

    # "Insert connect code" puts a cell attaching to this cluster into the notebook.
    page.locator(".jp-Notebook").click()
    card.locator(".jp-mlcloud-insert-connect").click()
    page.locator(".jp-Notebook .jp-Cell .cm-content",
                 has_text="%mlcloud connect from-notebook").wait_for()

    # Shutting the kernel down closes its cluster; the sidebar drops it.
    for session in lab.api("GET", "/api/sessions"):
        lab.api("DELETE", f"/api/sessions/{session['id']}")
    page.locator("#mlcloud-sidebar .jp-mlcloud-empty").wait_for(timeout=60_000)


def test_sidebar_restores_after_reload(lab: Lab, page: Any, tmp_path: Path) -> None:
    # A real pipeline's runs, recorded in the store the server reads: one failed, one whose
    # unchanged first step is cached.
    name = f"nightly-{uuid.uuid4().hex[:6]}"
    fail = tmp_path / "fail"
    fail.touch()
    nightly(tmp_path, name, [], fail=fail).run()
    fail.unlink()
    result = nightly(tmp_path, name, []).run()
    page.goto(f"{lab.url}/lab?token={lab.token}")
    open_sidebar(page)
    # JupyterLab saves the layout to the workspace shortly after it changes.
    wait_for(lambda: "mlcloud-sidebar" in json.dumps(lab.api("GET", "/lab/api/workspaces")),
             timeout=30, what="the layout to be saved")
    page.reload()
    page.locator("#mlcloud-sidebar .jp-mlcloud-header").wait_for()
    assert page.locator("#mlcloud-sidebar").is_visible()
    _pipeline_runs_and_their_graph(page, name, result.mlflow_run_id)


def _pipeline_runs_and_their_graph(page: Any, name: str, last: str) -> None:
    """The Pipelines section lists ``name``'s two runs, newest first, with each step's state
    and duration; Graph opens the last run's step graph."""
    card = page.locator(f'#mlcloud-sidebar .jp-mlcloud-pipeline[data-pipeline="{name}"]')
    card.wait_for(timeout=30_000)
    runs = card.locator(".jp-mlcloud-pipeline-run")
    assert [runs.nth(i).get_attribute("data-run-status") for i in range(2)] == [
        "finished", "failed"]
    states = [[step.get_attribute("data-step-state")
               for step in runs.nth(i).locator(".jp-mlcloud-step").all()] for i in range(2)]
    assert states == [["cached", "done", "done", "done"], ["done", "failed", "not-run", "not-run"]]
    assert " s" in runs.nth(0).locator('[data-step="train"]').inner_text()  # its duration

    runs.nth(0).locator(".jp-mlcloud-pipeline-graph").click()
    frame = iframe_of(page, f'.jp-mlcloud-panel iframe[src*="{last}"]')
    frame.locator("svg .step[data-step='register'][data-state='done']").wait_for()
    assert frame.locator("svg .step[data-step='prepare']").get_attribute("data-state") == "cached"
    assert frame.locator("svg line.edge").count() == 3
    page.screenshot(path=str(ARTIFACTS / "sidebar-pipeline.png"))


def test_sidebar_form_run_list_scale_and_shut_down(lab: Lab, page: Any) -> None:
    page.goto(f"{lab.url}/lab?token={lab.token}")
    open_sidebar(page)
    sidebar = page.locator("#mlcloud-sidebar")

    # A cluster from the "new cluster" form, held by the Jupyter server.
    sidebar.locator(".jp-mlcloud-new-name").fill("from-form")
    sidebar.locator(".jp-mlcloud-new-workers").fill("1")
    sidebar.locator(".jp-mlcloud-start").click()
    card = sidebar.locator('.jp-mlcloud-cluster[data-cluster-name="from-form"]')
    card.wait_for(timeout=60_000)
    _wait_for_workers(page, "from-form", 1)

    # A bad form value gets the server's sentence, not a stack trace.
    sidebar.locator(".jp-mlcloud-new-name").fill("bad name")
    sidebar.locator(".jp-mlcloud-start").click()
    page.get_by_text("cluster name 'bad name' is not allowed").wait_for()

    # A training run in a notebook kernel, attached to that cluster, shows in the run list.
    _new_notebook(lab, "train.ipynb")
    page.goto(f"{lab.url}/lab/tree/train.ipynb?token={lab.token}")
    open_sidebar(page)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.click()
    editor.fill("import jupyter_mlcloud as mlc\nmlc.connect('from-form')\n"
                "def fn(ctx):\n"
                "    for step in range(5):\n"
                "        ctx.report(loss=1.0 / (step + 1))\n"
                "run = mlc.train(fn)\nrun.result(120)\nrun.monitor()")
    page.keyboard.press("Shift+Enter")
    # The notebook shows the run's loss panel: BokehJS came from the server, the points from
    # the kernel's own run.
    page.locator(".mlcloud-loss-monitor canvas").first.wait_for(timeout=120_000)
    page.wait_for_function(
        """() => window.Bokeh && Bokeh.documents.some(doc => doc.all_models && [...doc.all_models]
             .some(m => m.name?.startsWith('metrics-') && m.data.step?.length === 5))""",
        timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "notebook-loss-panel.png"))
    run = sidebar.locator(".jp-mlcloud-run").first
    run.wait_for(timeout=120_000)
    page.wait_for_function(
        "() => document.querySelector('#mlcloud-sidebar .jp-mlcloud-run')"
        "?.dataset.runStatus === 'finished'", timeout=60_000)
    assert "step 5" in run.inner_text() and "loss" in run.inner_text()

    # The run's loss panel opens as a tab and its Bokeh source fills from the server.
    run.locator(".jp-mlcloud-open-loss").click()
    page.locator(".jp-mlcloud-panel iframe").wait_for()
    panel = iframe_of(page, ".jp-mlcloud-panel iframe")
    assert "/mlcloud/panels/loss/" in panel.url
    panel.wait_for_function(
        bokeh_model(f"metrics-{run.get_attribute('data-run-id')}", "m.data.step.length === 5"),
        timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "sidebar-run.png"))

    # Scale, then shut down, from the sidebar.
    card = sidebar.locator('.jp-mlcloud-cluster[data-cluster-name="from-form"]')
    card.locator(".jp-mlcloud-scale-to").fill("2")
    card.locator(".jp-mlcloud-scale").click()
    _wait_for_workers(page, "from-form", 2)
    card.locator(".jp-mlcloud-adapt-range").fill("1-3")
    card.locator(".jp-mlcloud-adapt").click()
    page.get_by_text("adapt needs MIN:MAX, e.g. 1:4, got '1-3'").wait_for()
    card.locator(".jp-mlcloud-adapt-range").fill("1:3")
    card.locator(".jp-mlcloud-adapt").click()
    page.get_by_text("Adapting from-form: done.").wait_for()
    card.locator(".jp-mlcloud-shutdown").click()
    card.wait_for(state="detached", timeout=60_000)


def _study_overlays_its_trials(page: Any, runs: list[str]) -> None:
    """A study whose trials are ``runs`` (written to the store the server reads, as mlc.tune
    lays it out) is listed with its trials by state; selecting it overlays their losses."""
    from mlflow import MlflowClient

    parent, _ = make_study(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), "lr-search", [
        {"state": "COMPLETE", "value": 0.5, "x": 0.5, "run_id": runs[0]},
        {"state": "PRUNED", "x": 7.5, "run_id": runs[1]},
        {"state": None, "x": 2.5}])  # running, its training run not tracked yet
    sidebar = page.locator("#mlcloud-sidebar")
    study = sidebar.locator(f'.jp-mlcloud-study[data-study-id="{parent}"]')
    study.wait_for(timeout=30_000)  # the store is read every 5 s
    assert study.locator(".jp-mlcloud-study-detail").inner_text() == (
        "1/3 complete · 1 pruned · 0 failed · 1 running · best loss 0.5000 (minimize)")

    study.locator(".jp-mlcloud-study-overlay").click()
    page.wait_for_function("() => document.querySelectorAll("
                           "'#mlcloud-sidebar .jp-mlcloud-study-selected .jp-mlcloud-trial')"
                           ".length === 3")
    trials = sidebar.locator(".jp-mlcloud-study-selected .jp-mlcloud-trial")
    assert [trials.nth(i).get_attribute("data-trial-state") for i in range(3)] == [
        "complete", "pruned", "running"]
    assert "x=7.5" in trials.nth(1).inner_text()
    page.locator(".jp-mlcloud-panel iframe >> nth=-1").wait_for()
    frame = page.locator(".jp-mlcloud-panel iframe").last.element_handle().content_frame()
    frame.wait_for_load_state()
    assert frame.url.endswith("/mlcloud/panels/loss/" + "%2C".join(runs))
    for run_id in runs:  # both trials' curves, in one panel
        frame.wait_for_function(bokeh_model(f"metrics-{run_id}", "m.data.step.length === 6"),
                                timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "sidebar-study.png"))


def test_overlay_two_runs_and_the_scheduler_gone_notice(lab: Lab, page: Any) -> None:
    held = held_cluster.start("held-ui", runs=2)
    try:
        page.goto(f"{lab.url}/lab?token={lab.token}")
        open_sidebar(page)
        sidebar = page.locator("#mlcloud-sidebar")
        page.wait_for_function(  # the lists come over the event socket
            "() => document.querySelector('#mlcloud-sidebar')?.dataset.updates === 'socket'")
        page.wait_for_function(
            "() => document.querySelectorAll('#mlcloud-sidebar .jp-mlcloud-run').length === 2",
            timeout=60_000)
        for run_id in held.runs:
            sidebar.locator(f'.jp-mlcloud-run[data-run-id="{run_id}"] .jp-mlcloud-run-pick').check()
        sidebar.locator(".jp-mlcloud-overlay").click()

        frame = iframe_of(page, ".jp-mlcloud-panel iframe")
        for run_id in held.runs:  # both runs' points, in one panel
            frame.wait_for_function(bokeh_model(f"metrics-{run_id}", "m.data.step.length === 6"),
                                    timeout=60_000)
        frame.wait_for_function(bokeh_model("figure-bytes_sent", "m.renderers.length === 2"))
        frame.wait_for_function(bokeh_model("rates", "m.text.includes('step 6')"))
        assert frame.evaluate(bokeh_model("notice", "!m.visible"))
        page.screenshot(path=str(ARTIFACTS / "loss-overlay.png"))
        _study_overlays_its_trials(page, held.runs)

        held.pause()  # the scheduler stops answering
        frame.wait_for_function(bokeh_model(
            "notice", "m.visible && m.text.includes('scheduler unreachable — retrying')"),
            timeout=30_000)
        page.wait_for_function(  # the run list keeps them, as last seen
            "() => document.querySelectorAll('#mlcloud-sidebar .jp-mlcloud-run-unreachable')"
            ".length === 2", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "loss-scheduler-gone.png"))
        held.resume()  # ... and answers again
        frame.wait_for_function(bokeh_model("notice", "!m.visible"), timeout=30_000)

        held.close()  # the cluster is shut down: its runs are gone
        frame.wait_for_function(
            bokeh_model("notice", "m.visible && m.text.includes('was shut down')"),
            timeout=30_000)
        page.wait_for_function(
            "() => !document.querySelector('#mlcloud-sidebar .jp-mlcloud-run')", timeout=30_000)
    finally:
        held.close()
