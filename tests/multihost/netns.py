"""Several hosts on one machine: Linux network namespaces joined by a bridge.

``hosts(n)`` builds ``n`` namespaces, each a host with one address in a /24 of 198.18.0.0/15
(set aside for network tests, never routed on the internet), and a switch namespace holding the
bridge that joins them. The root namespace (the test process) is one more port on that bridge,
with the subnet's ``.1``. There is no default route anywhere, so traffic goes only between these
namespaces, the test process and loopback. The bridge lives in its own namespace so that
firewall rules of the root namespace (a FORWARD policy of DROP, say) never see bridged traffic.

Every name starts with ``mlc<pid>-<n>``: a run never collides with another one's, and
``remove_stale()`` removes what a crashed run left behind (its process is gone) and nothing else.
Needs root and the ``ip`` command (iproute2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

PREFIX = "mlc"
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
_OURS = re.compile(rf"^{PREFIX}(\d+)-\d+")
_IFNAMSIZ = 15  # the longest interface name Linux takes
_runs = itertools.count()


def unavailable() -> str | None:
    """Why network namespaces cannot be built here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` (bounded); its output, or RuntimeError with its error text."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _stale(name: str) -> bool:
    match = _OURS.match(name)
    return match is not None and not psutil.pid_exists(int(match.group(1)))


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process left in ``namespace`` and wait (bounded) until they are gone."""
    pids = [int(p) for p in ip("netns", "pids", namespace, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def remove_stale() -> None:
    """Remove the namespaces and links of runs whose process is gone."""
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if _stale(name):
            _kill_inside(name)
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if _stale(name):
            ip("link", "del", name, check=False)


def _subnet(tag_seed: int) -> ipaddress.IPv4Network:
    """A /24 of RANGE that no interface of the root namespace has an address in."""
    used = [ipaddress.IPv4Address(a.address) for addresses in psutil.net_if_addrs().values()
            for a in addresses if a.family == socket.AF_INET]
    subnets = list(RANGE.subnets(new_prefix=24))
    for i in range(len(subnets)):
        subnet = subnets[(tag_seed + i) % len(subnets)]
        if not any(u in subnet for u in used):
            return subnet
    raise RuntimeError(f"every /24 of {RANGE} is in use on this machine")


@dataclass(frozen=True)
class Host:
    """One namespace: a host with one interface and one address."""

    namespace: str
    interface: str  # its end of the veth pair, inside the namespace
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class Network:
    """Hosts on one bridge, and the processes started on them (stopped with the network)."""

    gateway: str  # the test process's address on the bridge
    hosts: list[Host]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, host: Host | None, argv: Sequence[str], *, log: Path,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host`` (None: the root namespace), output to ``log``.

        It gets its own process group, so stopping it takes its children too (a Dask nanny
        and its worker, say).
        """
        with open(log, "ab") as out:
            process = subprocess.Popen(host.command(argv) if host else list(argv), stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=dict(env) if env is not None else None,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process group started here; SIGKILL what is left after ``timeout``."""
        groups = [p.pid for p in self.processes]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + timeout
            while groups and time.monotonic() < deadline:
                for p in self.processes:
                    p.poll()  # reap the leaders, or their groups stay alive as zombies
                groups = [g for g in groups if _group_alive(g)]
                time.sleep(0.05)
            if not groups:
                break
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        self.processes.clear()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg: a group whose members all exited is done.
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == group]
    return any(_status(p) not in (psutil.STATUS_ZOMBIE, None) for p in members)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _status(p: psutil.Process) -> str | None:
    try:
        return str(p.status())
    except psutil.NoSuchProcess:
        return None


@contextlib.contextmanager
def hosts(n: int) -> Iterator[Network]:
    """``n`` hosts on one bridge, reachable from the test process; everything built (and every
    process started through the network) is removed on the way out, even after a failure."""
    if not 1 <= n <= 9:
        raise ValueError(f"hosts(n) takes 1 to 9 hosts, got {n!r}.")
    seq = next(_runs)
    tag = f"{PREFIX}{os.getpid()}-{seq}"
    if len(tag) + 2 > _IFNAMSIZ:
        raise RuntimeError(f"names of {tag!r} would be too long for interfaces")
    subnet = _subnet(os.getpid() * 31 + seq)
    address = [str(a) for a in itertools.islice(subnet.hosts(), n + 1)]
    switch, bridge = f"{tag}sw", f"{tag}br"
    network = Network(gateway=address[0], hosts=[
        Host(f"{tag}n{i}", f"{tag}h{i}", address[i + 1]) for i in range(n)])
    made: list[str] = []
    links: list[str] = []
    try:
        ip("netns", "add", switch)
        made.append(switch)
        ip("-n", switch, "link", "add", bridge, "type", "bridge")
        ip("-n", switch, "link", "set", bridge, "up")
        ip("-n", switch, "link", "set", "lo", "up")
        # The root namespace's port: the test process talks to the hosts through it.
        ip("link", "add", f"{tag}g0", "type", "veth", "peer", "name", f"{tag}g1", "netns", switch)
        links.append(f"{tag}g0")
        ip("-n", switch, "link", "set", f"{tag}g1", "master", bridge, "up")
        ip("addr", "add", f"{network.gateway}/{subnet.prefixlen}", "dev", f"{tag}g0")
        ip("link", "set", f"{tag}g0", "up")
        for i, host in enumerate(network.hosts):
            ip("netns", "add", host.namespace)
            made.append(host.namespace)
            ip("-n", host.namespace, "link", "set", "lo", "up")
            ip("-n", switch, "link", "add", f"{tag}b{i}", "type", "veth", "peer", "name",
               host.interface, "netns", host.namespace)
            ip("-n", switch, "link", "set", f"{tag}b{i}", "master", bridge, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev",
               host.interface)
            ip("-n", host.namespace, "link", "set", host.interface, "up")
        yield network
    finally:
        network.stop()
        for namespace in reversed(made):
            _kill_inside(namespace)
            ip("netns", "del", namespace, check=False)
        for link in links:  # gone with the switch already, unless something held it
            if ip("link", "show", link, check=False):
                ip("link", "del", link, check=False)


def wait_for_port(address: str, port: int, timeout: float,
                  watch: Sequence[subprocess.Popen[Any]] = (), log: Path | None = None) -> None:
    """Return once ``address:port`` accepts a TCP connection; RuntimeError after ``timeout``
    seconds or as soon as a process in ``watch`` has exited (with ``log``'s tail)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((address, port)) == 0:
                return
        dead = [p for p in watch if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None else ""
            why = f"exited with {dead[0].returncode}" if dead else f"timed out after {timeout} s"
            raise RuntimeError(f"{address}:{port} never accepted a connection: {why}\n{tail}")
        time.sleep(0.1)
