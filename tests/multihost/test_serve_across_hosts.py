"""``mlc.serve`` on a cluster of two hosts (network namespaces): the router listens on its
worker's own address, which the test process reaches from the root namespace over the bridge,
and forwards to replicas on both hosts, with TLS and the token."""

from __future__ import annotations

import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc
from tests.multihost.conftest import SharedHosts


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_router_and_replicas_on_two_hosts_answer_the_root_namespace(across: SharedHosts,
                                                                     host: str | None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    workers = {across.worker_on(h): h for h in across.dask.workers}
    with mlc.serve(model, name="across", cluster=across.handle, replicas=2, host=host) as ep:
        # A worker's own address, never loopback or a wildcard, even for a wildcard bind.
        router_host = urlsplit(ep.url).hostname
        assert router_host in {h.address for h in workers.values()}, ep.url
        assert sorted(ep.replicas) == sorted(workers)  # one replica on each host
        for replica in ep.replica_info:
            assert urlsplit(replica["url"]).hostname == workers[replica["worker"]].address

        verify = ssl.create_default_context(cafile=ep.ca_file)  # the hostname is checked too
        with httpx.Client(base_url=ep.url, verify=verify, timeout=30) as plain:
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.reshape(-1).tolist()}]}
            assert plain.post(f"/v2/models/{ep.name}/infer", json=body).status_code == 401
            got = plain.post(f"/v2/models/{ep.name}/infer", json=body,
                             headers={"Authorization": f"Bearer {ep.token}"})
            assert got.status_code == 200, got.text
            out = np.asarray(got.json()["outputs"][0]["data"], np.float32).reshape(5, 3)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)

        answers = [ep.predict(x[i % 5:i % 5 + 1]) for i in range(10)]  # bounded: ten requests
        for i, answer in enumerate(answers):
            np.testing.assert_allclose(answer, want[i % 5:i % 5 + 1], rtol=1e-5, atol=1e-6)
        per_replica: dict[str, Any] = ep.stats()["replicas"]
        assert sum(r["requests"] for r in per_replica.values()) >= 11
        assert ep.stats()["errors"] == 0
        ports = [urlsplit(u) for u in [ep.url, *(r["url"] for r in ep.replica_info)]]
    for port in ports:  # closing the endpoint closed the router and every replica
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((port.hostname, port.port), timeout=10).close()
