"""Test hosts on one machine: Linux network namespaces joined by a bridge.

Each host is a namespace with its own loopback and one veth interface holding an address in a private
test subnet; the other ends of the veths sit on a bridge inside a "switch" namespace of its own. So
nothing is added to the machine's own namespace, every address used lives only inside namespaces
made here, and traffic between hosts goes nowhere else. Needs root (`ip netns`); callers skip
otherwise. Teardown kills every process left in the namespaces, then deletes them, even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Host:
    name: str
    """The network namespace."""
    address: str
    """Its address on the test subnet."""

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host."""
        return ["ip", "netns", "exec", self.name, *argv]


def hosts_unavailable() -> str | None:
    """Why namespaced hosts cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _kill_everything_in(namespace: str) -> None:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def namespaced_hosts(count: int) -> Iterator[list[Host]]:
    """`count` hosts 10.213.N.1, 10.213.N.2, ... (N from this process id, so concurrent test runs
    use different subnets and namespace names)."""
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{os.getpid() % 250 + 1}"
    switch = f"srsw{tag}"
    hosts = [Host(f"srh{index}-{tag}", f"{subnet}.{index + 1}") for index in range(count)]
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for index, host in enumerate(hosts):
            _ip("netns", "add", host.name)
            made.append(host.name)
            _ip("-n", host.name, "link", "set", "lo", "up")
            # both ends are created directly inside their namespaces
            _ip("-n", host.name, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{index}", "netns", switch)
            _ip("-n", switch, "link", "set", f"port{index}", "master", "br0")
            _ip("-n", switch, "link", "set", f"port{index}", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
        yield hosts
    finally:
        for namespace in reversed(made):
            _kill_everything_in(namespace)
        for namespace in reversed(made):
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("netns", "del", namespace)


def cut_off(host: Host) -> None:
    """Take the host off the network (its interface down), as a lost machine would be."""
    _ip("-n", host.name, "link", "set", "eth0", "down")
