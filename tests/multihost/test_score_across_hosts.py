"""``mlc.score`` with its blocks on two hosts (network namespaces) writes one zarr store in a
directory every host sees, holding what the same job writes on one host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
from distributed import wait

import jupyter_mlcloud as mlc
from tests.multihost.conftest import SharedHosts


def test_score_across_hosts_writes_one_store_equal_to_one_host(across: SharedHosts,
                                                               one_host: Any,
                                                               tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).double()
    client = across.handle.client

    def blocks() -> da.Array:  # the same rows, made on the workers of either cluster
        return da.random.RandomState(0).random_sample((2000, 5), chunks=(250, 5))

    # On this cluster's client: the one-host cluster, started later, is Dask's default.
    data = client.persist(blocks())
    wait(data)
    # The blocks lie on both hosts, so both write into the store.
    holders = {w for ws in client.who_has(data).values() for w in ws}
    assert holders == {across.worker_on(h) for h in across.dask.workers}, holders
    rows = client.compute(data).result(timeout=60)

    report = mlc.score(model, data, batch_size=64, output=str(tmp_path / "across.zarr"),
                       cluster=across.handle, progress=False, track=False)
    alone = mlc.score(model, blocks(), batch_size=64,
                      output=str(tmp_path / "alone.zarr"), cluster=one_host, progress=False,
                      track=False)

    assert report.summary["rows"] == 2000 and report.summary["blocks_written"] == 8
    assert set(report.summary["per_worker_share"]) == holders  # each host wrote its blocks
    written = report.open().values
    # To rounding: a small matrix product's last bit can follow its rows' memory alignment.
    np.testing.assert_allclose(written, alone.open().values, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        np.testing.assert_allclose(written, model(torch.as_tensor(rows)).numpy(), rtol=1e-12,
                                   atol=1e-15)
