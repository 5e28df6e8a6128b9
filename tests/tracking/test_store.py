"""Which store runs are recorded in: MLflow's own setting first, then the Dask config."""

from __future__ import annotations

import time
from pathlib import Path

import dask
import mlflow
import pytest
from mlflow.tracking._tracking_service import utils as tracking_utils

from jupyter_mlcloud.tracking import store
from tests.conftest import free_port


@pytest.fixture
def unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither MLFLOW_TRACKING_URI nor mlflow.set_tracking_uri (restored after the test)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)


def test_the_environment_wins_over_the_dask_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/env.db")
    with dask.config.set({"mlcloud.tracking.uri": "sqlite:////somewhere/dask.db"}):
        assert store.tracking_uri() == "sqlite:////somewhere/env.db"


@pytest.mark.usefixtures("unset")
def test_set_tracking_uri_wins_over_the_dask_config() -> None:
    mlflow.set_tracking_uri("sqlite:////somewhere/set.db")
    with dask.config.set({"mlcloud.tracking.uri": "sqlite:////somewhere/dask.db"}):
        assert store.tracking_uri() == "sqlite:////somewhere/set.db"


@pytest.mark.usefixtures("unset")
def test_default_is_an_absolute_sqlite_file_and_becomes_mlflows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with dask.config.set({"mlcloud.tracking.uri": None}):  # as a Jupyter server may set it
        assert store.tracking_uri() == expected
    assert mlflow.get_tracking_uri() == expected  # models:/ loads in this kernel agree
    assert store.artifact_root(expected) == str(tmp_path / "mlartifacts")


@pytest.mark.usefixtures("unset")
def test_the_dask_config_names_the_store(tmp_path: Path) -> None:
    with dask.config.set({"mlcloud.tracking.uri": f"sqlite:///{tmp_path}/team.db"}):
        assert store.tracking_uri() == f"sqlite:///{tmp_path}/team.db"


def test_a_silent_server_is_found_out_quickly() -> None:
    start = time.monotonic()
    assert not store.reachable(f"http://127.0.0.1:{free_port()}", timeout=1)
    assert time.monotonic() - start < 5  # MLflow's own client would retry for minutes
    assert store.reachable("sqlite:////no/such/dir/x.db")  # local stores: nothing to probe


@pytest.mark.usefixtures("unset")
def test_the_jupyter_server_puts_the_default_store_in_its_root(tmp_path: Path) -> None:
    with dask.config.set({"mlcloud.tracking.uri": None}):
        store.default_in(str(tmp_path))
        assert store.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}"
    with dask.config.set({"mlcloud.tracking.uri": "sqlite:////team/store.db"}):
        store.default_in(str(tmp_path))  # a configured store stays
        assert dask.config.get("mlcloud.tracking.uri") == "sqlite:////team/store.db"
