"""Which network interface a rank's collectives bind to.

By default gloo takes its address from the hostname, and in many containers the hostname
resolves to 127.0.0.1: ranks on different hosts then advertise loopback to each other and the
rendezvous fails. A rank binds its collectives to the interface that owns the address its Dask
worker listens on instead, which the scheduler and the other workers already reach.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

GLOO_VAR = "GLOO_SOCKET_IFNAME"
NCCL_VAR = "NCCL_SOCKET_IFNAME"
SOCKET_VARS = (GLOO_VAR, NCCL_VAR)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:  # psutil writes scoped IPv6 addresses as fe80::1%eth0
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def interface_for(ip: str, interfaces: Mapping[str, Iterable[Any]]) -> str | None:
    """The name of the interface that owns ``ip``, or None if no interface has it.

    ``interfaces`` maps names to addresses with ``.address`` and ``.netmask``, the shape of
    ``psutil.net_if_addrs()``. A loopback address (``127.x.y.z``, ``::1``) belongs to the
    loopback interface even when only ``127.0.0.1/8`` is configured there, as Linux routes it.
    """
    wanted = _ip(ip)
    if wanted is None:
        raise ValueError(f"{ip!r} is not an IP address; pass one such as 10.0.0.5 or fe80::1.")
    for name, addresses in interfaces.items():
        if any(_ip(str(a.address)) == wanted for a in addresses):
            return name
    if not wanted.is_loopback:
        return None
    for name, addresses in interfaces.items():
        for a in addresses:
            own = _ip(str(a.address))
            if own is None or not own.is_loopback or own.version != wanted.version:
                continue
            mask = _ip(str(a.netmask)) if a.netmask else None
            bits = bin(int(mask)).count("1") if mask is not None else own.max_prefixlen
            if wanted in ipaddress.ip_network(f"{own}/{bits}", strict=False):
                return name
    return None


def socket_env(ip: str, environ: Mapping[str, str],
               interfaces: Mapping[str, Iterable[Any]]) -> dict[str, str]:
    """The variables that bind gloo and NCCL to the interface owning ``ip``.

    A variable already in ``environ`` is the user's choice and is left out; nothing is
    returned when no interface owns ``ip`` (an address translated on the way in, say), so
    the backends keep their own defaults.
    """
    name = interface_for(ip, interfaces)
    if name is None:
        return {}
    # NCCL matches by prefix (eth1 would also take eth10) unless the name starts with '='.
    values = {GLOO_VAR: name, NCCL_VAR: f"={name}"}
    return {k: v for k, v in values.items() if k not in environ}


def address_ip(address: str) -> str:
    """The IP of a Dask address (``tcp://10.0.0.5:40001``), resolving a hostname if needed."""
    from distributed.comm import get_address_host

    host = get_address_host(address)
    if _ip(host) is not None:
        return host
    return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
