"""Ray Train's torch process group, with rank 0's store listening on its node's address only.

Ray Train's own set-up lets `init_process_group` create rank 0's TCPStore, which listens on every
interface of the machine (torch takes no bind address): anyone who can reach the machine could
write keys into a running job's store. Here rank 0's worker binds a listening socket to the address
Ray gave its node (127.0.0.1 for shardrec's embedded cluster; the cluster interface's address on a
multi-host cluster) and hands it to the store (`master_listen_fd`); the ranks then join with that
store. The rest follows Ray Train's torch backend (same environment variables, same timeout).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None
"""Rank 0's bound socket, between `bind_store_listener` and `join_process_group` (same worker)."""


def bind_store_listener() -> tuple[str, int]:
    """In rank 0's worker: listen on this node's address, on a port the system picks."""
    global _listener
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(512)
    _listener = listener
    return address, listener.getsockname()[1]


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: float) -> None:
    """In every worker: the store (served by rank 0 on its bound socket) and the process group."""
    global _listener
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
    if backend == "nccl":  # as Ray Train does: a stuck NCCL collective fails instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    listen_fd = None
    rank = world_rank
    if rank == 0:
        if _listener is None:
            raise RuntimeError("rank 0's store socket was not bound in this worker")
        listen_fd, _listener = _listener.detach(), None  # the store owns the descriptor from here
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundStoreTorchConfig") -> None:  # noqa: ANN001 (Ray's type)
        address, port = worker_group.execute_single(0, bind_store_listener)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK and the rest, as Ray Train sets them
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend=backend_config.backend,
                                                  world_rank=rank, world_size=len(worker_group), address=address,
                                                  port=port, timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """TorchConfig whose process group's store listens on rank 0's node address only."""

    @property
    def backend_cls(self) -> type:
        return _BoundStoreBackend
