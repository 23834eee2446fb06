"""Process-group setup: the only place that reads RANK / WORLD_SIZE and friends."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.sockets import bound_listener
from trainers.memory import keep_freed_memory


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    """Ranks on this node."""
    device: torch.device
    owns_process_group: bool
    """True when we created the process group (torchrun) and so must destroy it."""
    cpus: tuple[int, ...] = ()
    """The CPUs this rank's threads are bound to (`bind_to_own_cpus`); empty: not bound."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(backend: str = "gloo", timeout_s: float = 600.0, bind_cpus: bool = False) -> RankContext:
    """Join the job's process group, creating it from the environment if the launcher did not.

    Ray Train workers arrive with an initialised group; torchrun ranks arrive with MASTER_ADDR etc.
    The collective timeout bounds how long a healthy rank waits for a dead one. bind_cpus: bind
    this rank to its own share of the node's CPUs (`bind_to_own_cpus`).
    """
    keep_freed_memory()
    owns = False
    if not dist.is_initialized():
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"{name} is not set: start ranks with torchrun or through `shardrec train`")
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cpus = bind_to_own_cpus(local_rank, local_world_size) if bind_cpus else ()
    context = RankContext(dist.get_rank(), dist.get_world_size(), local_rank, local_world_size, device, owns, cpus)
    record = os.environ.get("SHARDREC_RECORD_LISTENERS")
    if record:  # testing aid: what this rank listens on once its process group is up
        Path(record).mkdir(parents=True, exist_ok=True)
        (Path(record) / f"rank-{context.rank}.json").write_text(json.dumps(listening_addresses()))
    return context


def bind_to_own_cpus(local_rank: int, local_world_size: int) -> tuple[int, ...]:
    """Bind every thread of this process (and so every thread it starts later) to local rank
    `local_rank`'s share of the CPUs the process may run on: whole cores in topology order
    (`cpus_by_core`), disjoint, as equal as they divide. Returns the share; nothing is bound
    (empty) for a node's only rank, or where there are fewer CPUs than ranks.

    Why: a rank's collectives run on threads of its own (gloo's transport), which need a CPU just
    when the rank's main thread sleeps in the collective. Unbound, the scheduler also runs them on
    the CPU where another rank is computing, which delays that rank, and every rank then waits for
    it at the next collective. Bound, a rank's threads take turns on its own CPUs, and no rank's
    compute is delayed by another rank's transport threads."""
    share = cpu_share(cpus_by_core(sorted(os.sched_getaffinity(0))), local_rank, local_world_size)
    if not share:
        return ()
    for thread in os.listdir("/proc/self/task"):  # the threads started so far: gloo's, Ray's, torch's
        try:
            os.sched_setaffinity(int(thread), share)
        except OSError:  # a thread that ended meanwhile
            continue
    return share


CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def cpus_by_core(cpus: list[int], topology: Path = CPU_TOPOLOGY) -> list[int]:
    """`cpus` in (socket, physical core, number) order: a core's hardware threads side by side, so
    that consecutive shares hold whole cores, of one socket where they divide. Linux numbers a
    core's second thread far from its first (on 2 sockets of 24 cores: 0-47 the cores, 48-95 their
    second threads), and in number order one rank's share would hold another's second threads.
    CPUs whose topology cannot be read follow the others, in number order."""
    def position(cpu: int) -> tuple[int, int, int, int]:
        try:
            folder = topology / f"cpu{cpu}" / "topology"
            return 0, int((folder / "physical_package_id").read_text()), int((folder / "core_id").read_text()), cpu
        except (OSError, ValueError):
            return 1, 0, 0, cpu
    return sorted(cpus, key=position)


def cpu_share(cpus: list[int], local_rank: int, local_world_size: int) -> tuple[int, ...]:
    """Local rank `local_rank`'s consecutive share of `cpus` split among `local_world_size` ranks
    (shares differ by one CPU at most); empty for a node's only rank or with fewer CPUs than ranks."""
    if local_world_size <= 1 or len(cpus) < local_world_size:
        return ()
    first, last = local_rank * len(cpus) // local_world_size, (local_rank + 1) * len(cpus) // local_world_size
    return tuple(cpus[first:last])


def listening_addresses(pid: int | str = "self") -> list[str]:
    """"address:port" of every TCP socket process `pid` listens on (from /proc; Linux only)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, one of this process's sockets
                address_hex, port_hex = fields[1].split(":")
                found.append(f"{_proc_address(address_hex, width)}:{int(port_hex, 16)}")
    return sorted(found)


def _proc_address(hex_address: str, width: int) -> str:
    """/proc/net/tcp's address (host-order 32-bit words in hex) -> its printed form."""
    raw = b"".join(int(hex_address[i:i + 8], 16).to_bytes(4, "little") for i in range(0, width, 8))
    return socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw)


class BoundTCPStore(dist.TCPStore):
    """A TCPStore whose server (is_master) listens on `host_name`'s address only: torch's own
    listens on every interface and takes no bind address, so the server is handed a socket bound
    here (`master_listen_fd`). With port 0 the system picks one (`.port` says which)."""

    def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                 *args: Any, **kwargs: Any) -> None:
        if is_master and kwargs.get("master_listen_fd") is None:
            kwargs["master_listen_fd"], port = bound_listener(host_name, port)  # the store owns it from here
        super().__init__(host_name, port, world_size, is_master, *args, **kwargs)


def teardown(context: RankContext) -> None:
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where the process group's collectives want their tensors: the rank's GPU under NCCL (which
    rejects CPU tensors), the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(flag: bool) -> bool:
    """True only if every rank passes True. Used so all ranks stop a loop at the same step: TorchRec's
    collectives hang when ranks run different numbers of steps."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_min(value: int) -> int:
    """The smallest `value` over the ranks (the value itself without a process group)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def node_address() -> str:
    """This rank's address as the job's other hosts reach it: the local end of a route to
    MASTER_ADDR (a UDP connect sends nothing). 127.0.0.1 on a loopback-only job."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master, int(os.environ.get("MASTER_PORT", "1"))))
            return probe.getsockname()[0]
        except OSError:
            return "unknown"


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
