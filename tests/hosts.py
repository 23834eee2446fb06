"""Test hosts on one machine: Linux network namespaces joined by a bridge, and a Ray cluster across them.

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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cluster.head_env import NODE_HEALTH_ENV, ensure_private_token

VENV_BIN = Path(sys.executable).parent
GCS_PORT = 6379  # each host has its own port space: fixed ports cannot clash with the machine's


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


def host_env() -> dict[str, str]:
    """The environment for Ray and shardrec commands run in the hosts: token authentication, and lost
    nodes detected as `shardrec cluster start` and the deployment manifests set heads to."""
    env = dict(os.environ, **NODE_HEALTH_ENV, RAY_AUTH_MODE="token",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # these hosts have a real interface to use
    return env


def _ray_start(host: Host, temp_dir: Path, head: Host | None) -> None:
    """`ray start` on `host` (as head when `head` is None), waited for."""
    command = [str(VENV_BIN / "ray"), "start", "--node-ip-address", host.address, "--num-cpus", "2",
               "--object-store-memory", str(300 * 2**20), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if head is None:
        command += ["--head", "--port", str(GCS_PORT), "--dashboard-host", host.address, "--include-dashboard", "true"]
    else:
        command += ["--address", f"{head.address}:{GCS_PORT}"]
    done = subprocess.run(host.command(command), env=host_env(), capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"ray start on {host.name} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")


@contextlib.contextmanager
def ray_cluster_on(hosts: list[Host]) -> Iterator[str]:
    """A Ray cluster with its head on hosts[0] and a worker node on each other host; yields the GCS
    address. Stopped with the namespaces (every process in them is killed at teardown); `ray stop` is
    not used, as it would reach other users' clusters. Temp dirs are short: Ray's socket paths must
    fit in 107 bytes."""
    scratch = Path(tempfile.mkdtemp(prefix="srmh-", dir="/tmp"))
    ensure_private_token()  # `ray start` with RAY_AUTH_MODE=token makes none on a machine without one
    try:
        for index, host in enumerate(hosts):
            _ray_start(host, scratch / f"n{index}", None if index == 0 else hosts[0])
        yield _joined(hosts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _joined(hosts: list[Host], timeout_s: float = 120.0) -> str:
    """The GCS address, once every host's node is alive in the cluster."""
    address = f"{hosts[0].address}:{GCS_PORT}"
    deadline = time.monotonic() + timeout_s
    probe = [sys.executable, "-c", "import ray; ray.init(address='%s', logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))" % address]
    while True:
        done = subprocess.run(hosts[0].command(probe), env=host_env(), capture_output=True, text=True, timeout=120)
        if done.stdout.strip().endswith(str(len(hosts))):
            return address
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker node(s) did not join: {done.stdout[-500:]} {done.stderr[-1500:]}")
        time.sleep(2)
