"""Which interface a rank binds its collectives to: the one owning its worker's address."""

from __future__ import annotations

import socket
from typing import Any, NamedTuple

import psutil
import pytest

from jupyter_mlcloud.train.rank.network import address_ip, interface_for, socket_env


class Addr(NamedTuple):  # the fields of psutil.net_if_addrs()'s entries that matter here
    family: int
    address: str
    netmask: str | None


def _addr(address: str, netmask: str | None = None, family: int = socket.AF_INET) -> Any:
    return Addr(family, address, netmask)


INTERFACES = {
    "lo": [_addr("127.0.0.1", "255.0.0.0"),
           _addr("::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", socket.AF_INET6),
           _addr("00:00:00:00:00:00", None, psutil.AF_LINK)],
    "eth0": [_addr("10.1.2.3", "255.255.0.0"),
             _addr("fe80::1%eth0", "ffff:ffff:ffff:ffff::", socket.AF_INET6),
             _addr("02:fc:00:00:00:01", None, psutil.AF_LINK)],
    "eth1": [_addr("198.18.0.2", "255.255.255.0")],
    "eth10": [_addr("198.18.1.2", "255.255.255.0")],
}


@pytest.mark.parametrize(("ip", "name"), [
    ("10.1.2.3", "eth0"),
    ("198.18.0.2", "eth1"),
    ("198.18.1.2", "eth10"),
    ("fe80::1", "eth0"),
    ("127.0.0.1", "lo"),
    ("127.0.0.5", "lo"),  # all of 127/8 is the loopback interface's
    ("::1", "lo"),
])
def test_the_interface_that_owns_the_address(ip: str, name: str) -> None:
    assert interface_for(ip, INTERFACES) == name


@pytest.mark.parametrize("ip", ["10.1.2.4", "198.18.0.3", "8.8.8.8", "fe80::2"])
def test_an_address_no_interface_owns_gives_none(ip: str) -> None:
    # An address in eth0's subnet is a neighbour's, not ours: sharing a subnet is not owning.
    assert interface_for(ip, INTERFACES) is None


def test_loopback_without_a_loopback_interface_gives_none() -> None:
    assert interface_for("127.0.0.1", {"eth0": INTERFACES["eth0"]}) is None


def test_a_hostname_is_refused_with_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"'worker-1' is not an IP address"):
        interface_for("worker-1", INTERFACES)


def test_gloo_and_nccl_bind_to_it_and_nccl_matches_the_exact_name() -> None:
    assert socket_env("198.18.0.2", {}, INTERFACES) == {
        "GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "=eth1"}


def test_the_users_own_setting_wins() -> None:
    environ = {"GLOO_SOCKET_IFNAME": "eth0", "PATH": "/bin"}
    assert socket_env("198.18.0.2", environ, INTERFACES) == {"NCCL_SOCKET_IFNAME": "=eth1"}
    environ["NCCL_SOCKET_IFNAME"] = "ib"
    assert socket_env("198.18.0.2", environ, INTERFACES) == {}


def test_nothing_is_set_when_no_interface_owns_the_address() -> None:
    assert socket_env("203.0.113.9", {}, INTERFACES) == {}


def test_the_ip_of_a_dask_address() -> None:
    assert address_ip("tcp://198.18.0.2:40001") == "198.18.0.2"
    assert address_ip("tcp://[::1]:40001") == "::1"
    assert address_ip("tcp://localhost:40001") in ("127.0.0.1", "::1")


def test_this_machines_loopback_maps_to_its_loopback_interface() -> None:
    loopback = [n for n, a in psutil.net_if_addrs().items()
                if any(x.address == "127.0.0.1" for x in a)]
    assert interface_for("127.0.0.1", psutil.net_if_addrs()) == loopback[0]


def test_a_rank_binds_for_its_run_only_and_keeps_the_users_setting() -> None:
    import os

    import jupyter_mlcloud as mlc

    def seen(ctx: Any) -> dict[str, str | None]:
        import torch.distributed as dist

        dist.barrier()
        return {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}

    with mlc.up(workers=1, name="bind-tests") as handle:
        # The worker listens on loopback: gloo binds to lo. The user's NCCL choice stays.
        handle.client.run(lambda: os.environ.update(NCCL_SOCKET_IFNAME="ib0"))
        during = mlc.train(seen, cluster=handle).result(timeout=120)
        after = handle.client.run(lambda: {k: os.environ.get(k) for k in during})
    assert during == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "ib0"}
    assert list(after.values()) == [{"GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": "ib0"}]
