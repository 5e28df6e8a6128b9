"""Replicas on real Dask workers, over real HTTPS on loopback (verified with the replica's
``ca_file``): outputs equal the model's own through JSON, Triton's binary tensors (a real
``tritonclient.http``) and v1; every auth, shape, size and overload case answers its status
and sentence; batching and its timings are visible in ``/metrics``; stopping frees the port and
leaves no thread behind."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.serving import host as worker_side
from jupyter_mlcloud.serving.launch import Replica, start_replica, stop_replica
from tests.conftest import ModuleCluster, wait_for
from tests.serving.conftest import expected, make_model, metric, v2_body

CLUSTER = {"name": "serving-tests", "workers": 2}
X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)


def make_gated() -> torch.nn.Module:
    """A model that records its batch sizes and, once closed, waits for its gate (opened from
    the test through the worker); a first value of -1 makes it raise. Built here, so it travels
    by value."""
    import threading

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.__dict__["gate"] = threading.Event()
            self.__dict__["batches"] = []

        def __getstate__(self) -> dict[str, Any]:
            state = dict(self.__dict__)
            state.pop("gate")
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            super().__setstate__(state)
            self.__dict__["gate"] = threading.Event()
            self.gate.set()  # open until a test closes it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.batches.append(len(x))  # every call, the replica's warm-up probe too
            if not self.gate.wait(60):
                raise TimeoutError("gate never opened")
            if float(x[0, 0]) == -1.0:
                raise ValueError("a row starting with -1 breaks this model")
            return self.linear(x)

    torch.manual_seed(1)
    return Gated()


def _gate(replica_id: str, action: str) -> list[int]:
    model = worker_side.loaded_model(replica_id)
    getattr(model.gate, action)()
    return list(model.batches)


def gate(cluster: Any, replica: Replica, action: str) -> list[int]:
    """``set``/``clear`` the gated replica's gate on its worker; the batch sizes so far."""
    return cluster.client.run(_gate, replica.id, action, workers=[replica.worker])[
        replica.worker]


def http(replica: Replica, token: str | None = "", timeout: float = 30.0) -> httpx.Client:
    """An HTTPS client verifying the replica with its ``ca_file``; its token unless told."""
    headers = {} if token is None else {"Authorization": f"Bearer {token or replica.token}"}
    return httpx.Client(base_url=replica.url, headers=headers, timeout=timeout,
                        verify=ssl.create_default_context(cafile=replica.ca_file))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def replica(module_cluster: ModuleCluster, model: torch.nn.Module) -> Iterator[Replica]:
    """The plain model's replica; its max_wait_ms is long, so any batch wait would show."""
    client = module_cluster.whole().client
    started = start_replica(client, model, name="mlp", max_wait_ms=2000, max_body_bytes=4096)
    yield started
    stop_replica(module_cluster.handle.client, started)


@pytest.fixture(scope="module")
def gated(module_cluster: ModuleCluster) -> Iterator[Replica]:
    client = module_cluster.whole().client
    started = start_replica(client, make_gated(), name="gated", version=3, max_batch_size=8,
                            max_wait_ms=0, max_queue=3)
    yield started
    try:
        gate(module_cluster.handle, started, "set")
    finally:
        stop_replica(module_cluster.handle.client, started)


def test_outputs_equal_the_models_own_over_json_and_v1(
        cluster: mlc.ClusterHandle, replica: Replica, model: torch.nn.Module) -> None:
    assert replica.url.startswith("https://127.0.0.1:")  # the local worker's own address
    with http(replica) as client:
        got = client.post("/v2/models/mlp/infer", json=v2_body(X, id="req-7"))
        assert got.status_code == 200, got.text
        doc = got.json()
        assert (doc["model_name"], doc["model_version"], doc["id"]) == ("mlp", "1", "req-7")
        (out,) = doc["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("output", "FP32", [5, 3])
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(5, 3),
                                      expected(model, X))
        versioned = client.post("/v2/models/mlp/versions/1/infer", json=v2_body(X[:2]))
        assert versioned.status_code == 200 and versioned.json()["id"]  # an id made for it
        np.testing.assert_array_equal(
            np.asarray(versioned.json()["outputs"][0]["data"], np.float32).reshape(2, 3),
            expected(model, X[:2]))
        v1 = client.post("/v1/models/mlp:predict", json={"instances": X.tolist()})
        assert v1.status_code == 200, v1.text
        assert v1.json()["model_version"] == "1"
        np.testing.assert_array_equal(np.asarray(v1.json()["predictions"], np.float32),
                                      expected(model, X))
        meta = client.get("/v2/models/mlp").json()
    assert meta == {"name": "mlp", "versions": ["1"], "platform": "pytorch",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
                    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]}


def test_tritonclient_with_its_defaults_binary_and_with_json(
        cluster: mlc.ClusterHandle, replica: Replica, model: torch.nn.Module) -> None:
    import tritonclient.http as triton

    def auth() -> dict[str, str]:  # fresh each call: tritonclient adds its own headers to it
        return {"Authorization": f"Bearer {replica.token}"}

    client = triton.InferenceServerClient(replica.url.removeprefix("https://"), ssl=True,
                                          ssl_options={"ca_certs": replica.ca_file})
    try:
        assert client.is_server_live() and client.is_server_ready()  # no token needed
        assert client.get_model_metadata("mlp", headers=auth())["inputs"][0]["shape"] == [-1, 4]
        binary = triton.InferInput("input", list(X.shape), "FP32")
        binary.set_data_from_numpy(X)  # the default: binary tensors both ways
        result = client.infer("mlp", [binary], headers=auth(), request_id="b-1")
        np.testing.assert_array_equal(result.as_numpy("output"), expected(model, X))
        response = result.get_response()
        assert response["model_version"] == "1" and response["id"] == "b-1"
        assert response["outputs"][0]["parameters"]["binary_data_size"] == X.shape[0] * 3 * 4
        as_json = triton.InferInput("input", list(X.shape), "FP32")
        as_json.set_data_from_numpy(X, binary_data=False)
        wanted = triton.InferRequestedOutput("output", binary_data=False)
        result = client.infer("mlp", [as_json], outputs=[wanted], model_version="1",
                              headers=auth())
        assert "data" in result.get_output("output")
        np.testing.assert_array_equal(result.as_numpy("output"), expected(model, X))
        with pytest.raises(triton.InferenceServerException, match="bearer token"):
            client.infer("mlp", [binary])
    finally:
        client.close()


def test_the_token_guards_every_route_but_health(cluster: mlc.ClusterHandle,
                                                 replica: Replica) -> None:
    for token in (None, "not-the-token"):
        with http(replica, token=token) as client:
            for method, path in (("POST", "/v2/models/mlp/infer"), ("GET", "/v2/models/mlp"),
                                 ("GET", "/metrics"), ("POST", "/v1/models/mlp:predict"),
                                 ("GET", "/no/such/route")):
                got = client.request(method, path, json=v2_body(X))
                assert got.status_code == 401, (token, path)
                assert got.json() == {"error": "this endpoint needs its bearer token: send"
                                      " the header 'Authorization: Bearer <token>'."}
                assert got.headers["www-authenticate"] == "Bearer"
            assert client.get("/v2/health/live").status_code == 200
            assert client.get("/v2/health/ready").json() == {"ready": True}


def test_bad_requests_get_400_with_a_sentence_naming_what_is_expected(
        cluster: mlc.ClusterHandle, replica: Replica) -> None:
    cases = [
        (b"{not json", "the request body is not valid JSON"),
        (json.dumps(v2_body(X[:, :3])).encode(),
         "input 'input' has shape [5, 3]; the model expects [-1, 4] (rows of 4 values)."),
        (json.dumps(v2_body(X[0])).encode(),
         "input 'input' has shape [4]; the model expects [-1, 4]"),
        (json.dumps(v2_body(X.astype(np.float64), "FP64")).encode(),
         "input 'input' has datatype FP64; the model expects FP32."),
        (json.dumps(v2_body(X, "STRING")).encode(), "datatype 'STRING' is not served"),
        (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                 "data": [1, 2, 3, 4]}]}).encode(),
         "the model takes one input, 'input'."),
        (json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                 "data": [1, 2]}]}).encode(),
         "'data' has 2 values but shape [2, 4] needs 8."),
    ]
    with http(replica) as client:
        for body, sentence in cases:
            got = client.post("/v2/models/mlp/infer", content=body)
            assert got.status_code == 400, (body, got.text)
            assert sentence in got.json()["error"]
            assert "Traceback" not in got.text
        v1 = client.post("/v1/models/mlp:predict", content=b"[1,")
        assert v1.status_code == 400 and "not valid JSON" in v1.json()["error"]
        v1 = client.post("/v1/models/mlp:predict", json={"instances": [[1.0, 2.0]]})
        assert v1.status_code == 400 and "expects [-1, 4]" in v1.json()["error"]


def test_other_models_and_versions_get_404(cluster: mlc.ClusterHandle,
                                           replica: Replica) -> None:
    with http(replica) as client:
        other = client.post("/v2/models/other/infer", json=v2_body(X))
        assert other.status_code == 404
        assert other.json()["error"] == ("model 'other' is not served here; this endpoint"
                                         " serves 'mlp'.")
        version = client.post("/v2/models/mlp/versions/2/infer", json=v2_body(X))
        assert version.status_code == 404 and "serves version 1" in version.json()["error"]


def test_an_oversize_body_gets_413(cluster: mlc.ClusterHandle, replica: Replica) -> None:
    big = np.full((300, 4), 0.123456, np.float32)  # about 12 kB of JSON: over the 4096 bytes
    with http(replica) as client:
        got = client.post("/v2/models/mlp/infer", json=v2_body(big))
        assert got.status_code == 413
        assert got.json()["error"] == ("the request body is larger than this endpoint's limit"
                                       " of 4096 bytes; send fewer rows per request.")


def test_an_idle_replica_never_waits_for_a_batch(cluster: mlc.ClusterHandle,
                                                 replica: Replica) -> None:
    with http(replica) as client:
        for _ in range(5):
            assert client.post("/v2/models/mlp/infer", json=v2_body(X[:1])).status_code == 200
        text = client.get("/metrics").text
    count = metric(text, "mlcloud_serving_latency_seconds_count", stage="batch_wait")
    waited = metric(text, "mlcloud_serving_latency_seconds_sum", stage="batch_wait")
    assert count >= 5
    # max_wait_ms is 2000: one request that waited for a batch would show as ~2 s here.
    assert waited < 0.05 * count


def test_metrics_split_latency_and_count_requests_errors_and_batches(
        cluster: mlc.ClusterHandle, replica: Replica) -> None:
    with http(replica) as client:
        before = client.get("/metrics").text
        assert client.post("/v2/models/mlp/infer", json=v2_body(X)).status_code == 200
        assert client.post("/v2/models/mlp/infer", content=b"{").status_code == 400
        got = client.get("/metrics")
    assert got.headers["content-type"].startswith("text/plain")
    text = got.text
    labels = {"model": "mlp", "version": "1"}

    def grew(name: str, **extra: str) -> float:
        return metric(text, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert grew("mlcloud_serving_requests_total") == 2
    assert grew("mlcloud_serving_errors_total", code="400") == 1
    for stage in ("queue", "batch_wait", "compute", "overhead", "total"):
        assert grew("mlcloud_serving_latency_seconds_count", stage=stage) == 1, stage
    assert grew("mlcloud_serving_latency_seconds_sum", stage="compute") > 0
    assert grew("mlcloud_serving_batch_size_count") == 1
    assert grew("mlcloud_serving_batch_size_sum") == 5  # the 5-row request, one batch
    assert metric(text, "mlcloud_serving_queue_depth", **labels) == 0
    assert metric(text, "mlcloud_serving_in_flight", **labels) == 0


def _post_many(replica: Replica, n: int, start: float = 0.0
               ) -> tuple[concurrent.futures.ThreadPoolExecutor, list[Any]]:
    pool = concurrent.futures.ThreadPoolExecutor(n)

    def one(i: int) -> httpx.Response:
        with http(replica, timeout=60) as client:
            return client.post("/v2/models/gated/infer",
                               json=v2_body(X[:1] + start + i, id=f"r{i}"))

    return pool, [pool.submit(one, i) for i in range(n)]


def _queue_depth(replica: Replica) -> float:
    with http(replica) as client:
        return metric(client.get("/metrics").text, "mlcloud_serving_queue_depth")


def test_requests_arriving_while_busy_are_batched(cluster: mlc.ClusterHandle,
                                                  gated: Replica) -> None:
    before = gate(cluster, gated, "clear")
    pool, futures = _post_many(gated, 1)
    wait_for(lambda: len(gate(cluster, gated, "clear")) == len(before) + 1, 30,
             "the first request in the model")
    more_pool, more = _post_many(gated, 3, start=10.0)
    wait_for(lambda: _queue_depth(gated) == 3, 30, "three requests queued")
    batches = gate(cluster, gated, "set")
    answers = [f.result(60) for f in futures + more]
    pool.shutdown()
    more_pool.shutdown()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert [a.json()["model_version"] for a in answers] == ["3"] * 4
    batches = gate(cluster, gated, "set")[len(before):]
    assert batches == [1, 3]  # the first alone at once, the three queued as one batch
    with http(gated) as client:
        text = client.get("/metrics").text
    assert metric(text, "mlcloud_serving_batch_size_bucket", le="2.0") < metric(
        text, "mlcloud_serving_batch_size_bucket", le="4.0")


def test_a_full_queue_answers_503_with_retry_after(cluster: mlc.ClusterHandle,
                                                   gated: Replica) -> None:
    before = gate(cluster, gated, "clear")
    pool, futures = _post_many(gated, 1)
    wait_for(lambda: len(gate(cluster, gated, "clear")) == len(before) + 1, 30,
             "the first request in the model")
    more_pool, more = _post_many(gated, 3)
    wait_for(lambda: _queue_depth(gated) == 3, 30, "max_queue requests queued")
    try:
        with http(gated) as client:
            refused = client.post("/v2/models/gated/infer", json=v2_body(X[:1]))
    finally:
        gate(cluster, gated, "set")
    assert refused.status_code == 503
    assert refused.json()["error"] == ("the replica's queue is full (3 requests waiting);"
                                       " retry later.")
    assert int(refused.headers["retry-after"]) >= 1
    assert all(f.result(60).status_code == 200 for f in futures + more)
    pool.shutdown()
    more_pool.shutdown()


def test_a_failing_model_answers_500_with_a_sentence(cluster: mlc.ClusterHandle,
                                                     gated: Replica) -> None:
    gate(cluster, gated, "set")
    bad = np.full((1, 4), -1.0, np.float32)
    with http(gated) as client:
        got = client.post("/v2/models/gated/infer", json=v2_body(bad))
        assert got.status_code == 500
        assert got.json() == {"error": "the model failed on this request (ValueError: a row"
                              " starting with -1 breaks this model)."}
        assert client.post("/v2/models/gated/infer", json=v2_body(X[:1])).status_code == 200


def _replica_threads(replica_id: str) -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if replica_id in t.name]


def _child_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def test_a_saved_model_file_is_served_and_stopping_frees_the_port(
        cluster: mlc.ClusterHandle, model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(model, path)
    client = cluster.client
    children = client.run(_child_pids)
    started = start_replica(client, str(path), name="saved", version="7")
    try:
        assert client.run(_replica_threads, started.id, workers=[started.worker])[
            started.worker]  # serving: its server thread is there
        with http(started) as http_client:
            got = http_client.post("/v2/models/saved/infer", json=v2_body(X))
        assert got.status_code == 200 and got.json()["model_version"] == "7"
        np.testing.assert_array_equal(
            np.asarray(got.json()["outputs"][0]["data"], np.float32).reshape(5, 3),
            expected(model, X))
    finally:
        assert stop_replica(client, started)
    assert client.run(_replica_threads, started.id) == {w: [] for w in children}
    assert client.run(_child_pids) == children  # nothing spawned, nothing left
    assert all(r.id != started.id for rs in client.run(worker_side.replicas).values()
               for r in rs)
    assert not Path(started.ca_file).exists()  # the kernel's copy of the certificate
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection((started.host, started.port), timeout=10).close()
    with socket.socket() as probe:  # and the port is free again
        probe.bind((started.host, started.port))
    assert not stop_replica(client, started)  # already stopped: nothing to do


def test_bad_arguments_fail_early_in_one_sentence(cluster: mlc.ClusterHandle,
                                                  model: torch.nn.Module) -> None:
    client = cluster.client
    certificates = set(Path(tempfile.gettempdir()).glob("mlcloud-tls-*"))
    with pytest.raises(ValueError, match="name 'a b' is not a valid model name"):
        start_replica(client, model, name="a b")
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1, got 0"):
        start_replica(client, model, name="m", max_batch_size=0)
    with pytest.raises(ValueError, match="worker 'tcp://nowhere:1' is not a worker"):
        start_replica(client, model, name="m", worker="tcp://nowhere:1")
    with pytest.raises(ValueError, match="certfile and keyfile go together"):
        start_replica(client, model, name="m", certfile="cert.pem")
    with pytest.raises(ValueError, match="the model cannot take rows of 9 feature"):
        start_replica(client, model, name="m", features=9)  # found on the worker, at load
    assert all(r.name != "m" for rs in client.run(worker_side.replicas).values() for r in rs)
    assert set(Path(tempfile.gettempdir()).glob("mlcloud-tls-*")) == certificates


def test_a_worker_call_without_an_answer_fails_after_its_timeout(
        cluster: mlc.ClusterHandle) -> None:
    import time

    from jupyter_mlcloud.serving.launch import call

    worker = sorted(cluster.client.scheduler_info()["workers"])[0]
    # The sleep itself would end without an error: the TimeoutError is the call giving up.
    with pytest.raises(TimeoutError, match=rf"^worker {worker} did not answer sleep within"
                                           r" 0\.5 s\.$"):
        call(cluster.client, time.sleep, 5, worker=worker, timeout=0.5)
    assert call(cluster.client, len, "abc", worker=worker) == 3


def test_the_kernel_side_loads_no_torch_or_mlflow() -> None:
    import subprocess
    import sys

    code = ("import sys; import jupyter_mlcloud.serving.launch, jupyter_mlcloud.serving.host;"
            " print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"
