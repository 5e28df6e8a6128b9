"""Discovery files across real processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import discovery
from tests.conftest import discovery_files, read_line, wait_for

CHILD = """
import sys, jupyter_mlcloud as mlc
c = mlc.up(workers=1, name="from-child")
print(c.address, flush=True)
sys.stdin.readline()
"""


def test_cluster_started_in_another_process_is_listed_attached_and_cleaned() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        address = read_line(child, what="its address").strip()
        [entry] = mlc.list_clusters(live=True)
        assert entry["name"] == "from-child" and entry["address"] == address
        assert entry["pid"] == child.pid and entry["kind"] == "local-cpu"
        assert (entry["workers"], entry["threads"], entry["reachable"]) == (1, 1, True)
        # A notebook can attach by name and run work there.
        with mlc.connect("from-child") as handle:
            assert handle.client.submit(sum, [1, 2, 3]).result() == 6
        assert [e["name"] for e in mlc.list_clusters()] == ["from-child"]  # still theirs
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(60) == 0  # exits without closing: atexit removes the file
    assert mlc.list_clusters() == []


def test_killed_owner_leaves_a_stale_file_that_is_ignored_and_removed() -> None:
    code = CHILD.replace("sys.stdin.readline()", "import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, check=True, timeout=120)
    [stale] = discovery_files()
    assert json.loads(stale.read_text())["name"] == "from-child"
    assert mlc.list_clusters() == []  # dead owner: ignored ...
    assert discovery_files() == []  # ... and cleaned
    with mlc.up(workers=1, name="from-child") as again:  # so the name is free again
        assert again.name == "from-child"


def test_reserve_is_exclusive_and_write_is_atomic() -> None:
    record = discovery.ClusterRecord(name="one", kind="local-cpu")
    discovery.reserve(record)
    with pytest.raises(ValueError, match="a cluster named 'one' already exists"):
        discovery.reserve(discovery.ClusterRecord(name="one", kind="local-cpu"))
    record.status = "running"
    discovery.write(record)
    assert discovery.get("one").status == "running"
    assert [p.name for p in discovery_files()] == ["one.json"]  # no temp files left
    discovery.remove("one", pid=record.pid + 1)  # someone else's pid: left alone
    assert discovery.get("one") is not None
    discovery.remove("one", pid=record.pid)
    wait_for(lambda: discovery.get("one") is None, what="record removed")
