"""The model registry against a real store: versions, moving aliases, models:/ everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell
from mlflow import MlflowClient

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cli import main as cli_main
from jupyter_mlcloud.tracking import registry
from tests.conftest import make_fit

CLUSTER = {"name": "registry-tests", "workers": 2}


@pytest.fixture
def uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    value = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    return value


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 1)).double()


def test_a_run_registered_as_champion_loads_and_predicts_what_the_run_returned(
        cluster: mlc.ClusterHandle, uri: str) -> None:
    run = mlc.train(make_fit(epochs=1), cluster=cluster)
    model = run.result()
    version = mlc.register(run, "digits", alias="champion")
    assert version.name == "digits" and version.version == 1
    assert version.aliases == ["champion"] and version.run_id == run.mlflow_run_id
    loaded = mlflow.pytorch.load_model("models:/digits@champion")
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))

    table = mlc.models()  # the source run's metrics come along
    assert table.loc[0, "name"] == "digits" and table.loc[0, "aliases"] == "champion"
    assert table.loc[0, "loss"] == pytest.approx(
        run.metrics[run.metrics["rank"] == 0]["loss"].iloc[-1])


def test_aliases_move_and_versions_count_up(uri: str, tmp_path: Path) -> None:
    first = mlc.register(net(0), "pricer", alias="champion")
    path = tmp_path / "second.pt"
    torch.save(net(1), path)
    second = mlc.register(str(path), "pricer", alias="champion")  # a saved model's path
    assert (first.version, second.version) == (1, 2)
    assert MlflowClient(uri).get_model_version_by_alias("pricer", "champion").version == 2
    registry.set_alias("pricer", "champion", 1)  # roll back
    listed = registry.models()
    assert listed[0]["aliases"] == {"champion": 1}
    assert [v["version"] for v in listed[0]["versions"]] == [2, 1]
    assert listed[0]["versions"][1]["aliases"] == ["champion"]
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(mlflow.pytorch.load_model("models:/pricer@champion")(x), net(0)(x))
    assert torch.equal(registry.load("models:/pricer/2")(x), net(1)(x))


def test_unknown_names_versions_and_aliases_say_what_exists(uri: str) -> None:
    mlc.register(net(0), "known", alias="champion")
    with pytest.raises(ValueError, match=r"no registered model 'nope'.*has: known\."):
        registry.load("models:/nope@champion")
    with pytest.raises(ValueError, match=r"'known' has no version '7'; it has version\(s\) 1\."):
        registry.load("models:/known/7")
    with pytest.raises(ValueError, match=r"no alias 'prod'; its aliases are: @champion \(vers"):
        registry.load("models:/known@prod")
    with pytest.raises(ValueError, match="has no version '3'"):
        registry.set_alias("known", "champion", 3)
    with pytest.raises(ValueError, match="alias must be a word"):
        mlc.register(net(0), "known", alias="v2")
    with pytest.raises(ValueError, match="name must be a model name"):
        mlc.register(net(0), "a/b")


def test_an_untracked_run_cannot_be_registered(cluster: mlc.ClusterHandle, uri: str) -> None:
    run = mlc.train(make_fit(epochs=1), cluster=cluster, track=False)
    run.result()
    with pytest.raises(ValueError, match="started with track=False"):
        mlc.register(run, "x")

    def no_model(ctx: Any) -> float:
        return 1.0

    run = mlc.train(no_model, cluster=cluster)
    run.result()
    with pytest.raises(ValueError, match="logged no model to MLflow"):
        mlc.register(run, "x")


def test_models_uris_score_in_the_api_the_magic_and_the_cli(
        cluster: mlc.ClusterHandle, uri: str, tmp_path: Path, shell: InteractiveShell,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = net(0)
    mlc.register(model, "scorer", alias="champion")
    rows = np.random.default_rng(0).normal(size=(100, 3))
    with torch.no_grad():
        expected = model(torch.as_tensor(rows)).numpy()
    scores = mlc.score("models:/scorer@champion", rows, cluster=cluster).compute()
    np.testing.assert_array_equal(scores, expected)

    shell.user_ns["rows"] = rows
    shell.run_line_magic("batch_score", f"models:/scorer/1 rows --out got --cluster"
                                        f" {cluster.name}")
    np.testing.assert_array_equal(shell.user_ns["got"].compute(), expected)
    listing = shell.run_line_magic("mlcloud", "models")
    assert list(listing["name"]) == ["scorer"] and list(listing["aliases"]) == ["champion"]

    import xarray as xr

    xr.Dataset({f: ("sample", rows[:, i]) for i, f in enumerate("abc")}).to_zarr(
        tmp_path / "in.zarr")
    code = cli_main(["score", "--model", "models:/scorer@champion", "--input",
                     str(tmp_path / "in.zarr"), "--output", str(tmp_path / "out.zarr"),
                     "--scheduler", cluster.address, "--features", "a,b,c", "--no-track"])
    assert code == 0, capsys.readouterr().err
    written = xr.open_zarr(tmp_path / "out.zarr")["score"].values
    np.testing.assert_array_equal(written, expected)
    code = cli_main(["score", "--model", "models:/scorer@prod", "--input",
                     str(tmp_path / "in.zarr"), "--output", str(tmp_path / "o2.zarr"),
                     "--scheduler", cluster.address, "--features", "a,b,c"])
    assert code == 2 and "no alias 'prod'" in capsys.readouterr().err
    assert not (tmp_path / "o2.zarr").exists()
