"""%mlcloud serve|endpoints|unserve through IPython, and jupyter-mlcloud serve|endpoints|unserve
as real subprocesses, on a real cluster with worker processes, over real HTTPS."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import control
from tests.conftest import ModuleCluster, ipython_shell
from tests.serving.conftest import refused

CLUSTER = {"name": "serve-frontends", "workers": 2}
CLI = [sys.executable, "-m", "jupyter_mlcloud.cli"]
X = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def shell(module_cluster: ModuleCluster) -> Iterator[InteractiveShell]:
    with ipython_shell() as ip:
        ip.run_cell("import torch\n"
                    "torch.manual_seed(0)\n"
                    "lin = torch.nn.Linear(3, 2)")
        yield ip


def _served() -> list[str]:
    """On a worker: the ids of the replicas and routers it runs."""
    from jupyter_mlcloud.serving import host, router

    return [r.id for r in host.replicas()] + [r.id for r in router.routers()]


def _nothing_runs(cluster: Any) -> None:
    assert control.names(cluster.client) == []
    assert [i for ids in cluster.client.run(_served).values() for i in ids] == []


def _infer(url: str, token: str, ca_file: str, x: np.ndarray) -> np.ndarray:
    """An Open Inference Protocol v2 JSON request, as any HTTP client would send it."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}
    with httpx.Client(verify=ssl.create_default_context(cafile=ca_file), timeout=60) as c:
        answer = c.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _expected(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- the magics


def test_serve_magic_predict_through_the_printed_url_list_and_unserve(
        shell: InteractiveShell, cluster: Any, capsys: pytest.CaptureFixture) -> None:
    result = shell.run_cell("%mlcloud serve lin --name lin --replicas 2 --max-batch-size 8")
    ep = result.result
    assert isinstance(ep, mlc.Endpoint) and shell.user_ns["_"] is ep
    out = capsys.readouterr().out
    url = re.search(r"^Serving 'lin' at (https://\S+) \(v1 100%, 2 replica\(s\)\)", out, re.M)
    ca_file = re.search(r"CA certificate: (\S+)$", out, re.M)
    infer_url = re.search(r"POST Open Inference Protocol v2 JSON to (\S+) with", out)
    assert url and ca_file and infer_url, out
    assert "_.token" in out and ep.token not in out  # where it is, not the secret itself
    assert infer_url[1] == f"{url[1]}/v2/models/lin/infer"
    np.testing.assert_allclose(_infer(infer_url[1], ep.token, ca_file[1], X),
                               _expected(shell.user_ns["lin"], X), rtol=1e-6)
    assert sorted(ep.replicas) == sorted(cluster.client.scheduler_info()["workers"])

    with pytest.raises(UsageError, match="an endpoint named 'lin' already runs"):
        shell.run_line_magic("mlcloud", "serve lin --name lin")

    table = shell.run_line_magic("mlcloud", "endpoints")
    assert isinstance(table, pd.DataFrame) and list(table["name"]) == ["lin"]
    row = table.iloc[0]
    assert (row["url"], row["versions"], row["replicas"], row["errors"]) == (
        url[1], "v1 100%", 2, 0)
    assert row["rps"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]

    urls = [ep.url] + [r["url"] for r in ep.replica_info]
    shell.run_line_magic("mlcloud", "unserve lin")
    assert "Stopped endpoint 'lin'" in capsys.readouterr().out
    assert all(refused(u) for u in urls)
    _nothing_runs(cluster)
    assert shell.run_line_magic("mlcloud", "endpoints") is None
    assert "No endpoints on this cluster" in capsys.readouterr().out


def test_serve_magic_autoscale_on_a_named_cluster(shell: InteractiveShell, cluster: Any,
                                                  capsys: pytest.CaptureFixture) -> None:
    ep = shell.run_line_magic(
        "mlcloud", f"serve lin --name scaled --autoscale 1:2 --max-wait-ms 2"
                   f" --slo-ms 500 --device cpu --cluster {cluster.name}")
    try:
        assert "1 replica(s), autoscaling 1:2" in capsys.readouterr().out
        assert ep.autoscale == (1, 2) and len(ep.replicas) == 1
        np.testing.assert_allclose(ep.predict(X), _expected(shell.user_ns["lin"], X),
                                   rtol=1e-6)
        row = shell.run_line_magic("mlcloud", f"endpoints --cluster {cluster.name}").iloc[0]
        assert (row["name"], row["autoscale"]) == ("scaled", "1:2")
    finally:
        shell.run_line_magic("mlcloud", f"unserve scaled --cluster {cluster.name}")
    _nothing_runs(cluster)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("serve lin --name x --replicas 2 --autoscale 1:3",
         r"^%mlcloud serve: argument --autoscale: not allowed with argument --replicas;"),
        ("serve lin --name x --autoscale 1-3",
         r"autoscale must look like 'MIN:MAX' \(e\.g\. '1:4'\), got '1-3'"),
        ("serve lin --name x --autoscale 3:1", "1 <= MIN <= MAX, got 3:1"),
        ("serve lin --name x --replicas 0", "replicas must be an integer >= 1, got 0"),
        ("serve lin --name x --replicas two", "--replicas: expected a whole number, got 'two'"),
        ("serve lin --name x --max-batch-size 0", "max_batch_size must be an integer >= 1"),
        ("serve lin --name x --max-wait-ms -1", "max_wait_ms must be a number >= 0, got -1"),
        ("serve lin --name x --max-wait-ms soon", "--max-wait-ms: expected a number, got 'soon'"),
        ("serve lin --name x --max-queue 0", "max_queue must be an integer >= 1, got 0"),
        ("serve lin --name x --slo-ms 0", "slo_ms must be a number > 0 or None, got 0"),
        ("serve lin --name x --device gpu", "device must be one of auto, cpu, cuda, got 'gpu'"),
        ("serve lin --name x --certfile c.pem", "certfile and keyfile go together"),
        ("serve lin --name x --certfile c.pem --keyfile k.pem", "certfile 'c.pem' is not a file"),
        ("serve lin --name 'a b'", "name 'a b' is not a valid model name"),
        ("serve lin", "the following arguments are required: --name"),
        ("serve", "the following arguments are required: MODEL, --name"),
        ("serve nosuch --name x", "MODEL 'nosuch' is neither a name in the notebook nor"),
        ("serve missing.pt --name x", "cannot read the model file 'missing.pt'"),
        ("serve lin --name x --cluster elsewhere", "no cluster named 'elsewhere'"),
        ("serve lin --name x --batch 4", r"unrecognized arguments: --batch 4; the options are"),
        ("unserve nope", "no endpoint named 'nope' runs on this cluster; running: none"),
        ("unserve", "the following arguments are required: NAME"),
        ("endpoints --cluster elsewhere", "no cluster named 'elsewhere'"),
    ],
)
def test_bad_serve_lines_say_one_sentence_and_leave_nothing(
        shell: InteractiveShell, cluster: Any, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        shell.run_line_magic("mlcloud", line)
    assert "\n" not in str(err.value).strip()
    _nothing_runs(cluster)


# ---------------------------------------------------------------- shared options


def _parsers() -> list[argparse.ArgumentParser]:
    """The %mlcloud serve parser and the CLI's serve parser."""
    from jupyter_mlcloud import cli
    from jupyter_mlcloud.magics import SUBCOMMAND_PARSERS

    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [SUBCOMMAND_PARSERS["serve"], sub.choices["serve"]]


@pytest.mark.parametrize("which", ["magic", "cli"])
def test_serve_flags_are_the_api_keywords_with_its_defaults(which: str) -> None:
    from jupyter_mlcloud.flags import serve_keywords
    from jupyter_mlcloud.serving.api import serve

    parser = _parsers()[which == "cli"]
    argv = (["--model", "m.pt"] if which == "cli" else ["m.pt"]) + ["--name", "n"]
    if which == "cli":
        argv += ["--scheduler", "tcp://127.0.0.1:9"]
    keywords = serve_keywords(parser.parse_args(argv))
    params = inspect.signature(serve).parameters
    assert set(keywords) <= set(params) - {"model", "cluster"}
    assert {"name", "replicas", "autoscale", "max_batch_size", "max_wait_ms", "max_queue",
            "slo_ms", "host", "certfile", "keyfile", "device"} <= set(keywords)
    for key, value in keywords.items():
        if key != "name":
            assert value == params[key].default, key
    assert serve_keywords(parser.parse_args([*argv, "--autoscale", "1:4", "--max-wait-ms",
                                             "2.5"]))["autoscale"] == "1:4"


# ---------------------------------------------------------------- the CLI


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_serves_a_saved_model_that_outlives_it_lists_and_unserves(
        cluster: Any, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(model, tmp_path / "model.pt")

    served = _cli("serve", "--model", str(tmp_path / "model.pt"), "--name", "saved",
                  "--scheduler", cluster.address, "--replicas", "2", cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    info = json.loads(served.stdout.strip().splitlines()[-1])
    ca_file = tmp_path / "saved-ca.pem"  # the default --ca-out, in the working directory
    assert Path(info["ca_file"]) == ca_file
    assert ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert info["url"].startswith("https://") and info["replicas"] == 2
    assert info["infer_url"] == f"{info['url']}/v2/models/saved/infer"
    # The command has exited; the endpoint runs on.
    np.testing.assert_allclose(_infer(info["infer_url"], info["token"], str(ca_file), X),
                               _expected(model, X), rtol=1e-6)

    listed = _cli("endpoints", "--scheduler", cluster.address)
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"saved\s+{re.escape(info['url'])}\s+v1 100%\s+2\s", listed.stdout), \
        listed.stdout
    as_json = _cli("endpoints", "--scheduler", cluster.address, "--json")
    (record,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (record["name"], record["url"], record["replicas"], record["errors"]) == (
        "saved", info["url"], 2, 0)
    assert record["rps"] > 0

    urls = [info["url"]] + [r["url"] for r in mlc.endpoints(cluster)[0].replica_info]
    stopped = _cli("unserve", "saved", "--scheduler", cluster.address)
    assert stopped.returncode == 0 and "Stopped endpoint 'saved'" in stopped.stdout
    assert all(refused(u) for u in urls)
    _nothing_runs(cluster)
    empty = _cli("endpoints", "--scheduler", cluster.address)
    assert "No endpoints on this cluster." in empty.stdout


def test_cli_bad_input_exit_codes_and_nothing_left(cluster: Any, tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(3, 2), tmp_path / "model.pt")
    base = ["serve", "--model", str(tmp_path / "model.pt"), "--name", "bad"]
    cases = [
        ([*base, "--scheduler", cluster.address, "--replicas", "0"], 2,
         "replicas must be an integer >= 1, got 0"),
        ([*base, "--scheduler", cluster.address, "--replicas", "2", "--autoscale", "1:2"], 2,
         "argument --autoscale: not allowed with argument --replicas"),
        ([*base, "--scheduler", cluster.address, "--ca-out", str(tmp_path / "no" / "ca.pem")],
         2, "its folder does not exist; nothing was started"),
        (["serve", "--model", str(tmp_path / "none.pt"), "--name", "bad", "--scheduler",
          cluster.address], 2, "cannot read the model file"),
        ([*base, "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"], 3,
         "could not reach a Dask scheduler"),
        (base, 2, "the following arguments are required: --scheduler"),
        (["unserve", "nope", "--scheduler", cluster.address], 2,
         "no endpoint named 'nope' runs on this cluster"),
    ]
    for args, code, message in cases:
        done = _cli(*args, cwd=tmp_path)
        assert (done.returncode, message in done.stderr) == (code, True), (args, done.stderr)
    assert not list(tmp_path.glob("*.pem"))  # no CA file written
    _nothing_runs(cluster)
