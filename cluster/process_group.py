"""Ray Train's torch process group, with rank 0's store listening on its node's address only.

Ray Train's own set-up lets `init_process_group` create rank 0's TCPStore, which listens on every
interface of the machine (torch takes no bind address): anyone who can reach the machine could
write keys into a running job's store. Here rank 0's worker serves the store itself, bound to the
address Ray gave its node (127.0.0.1 for shardrec's embedded cluster; the cluster interface's address
on a multi-host cluster) through `trainers.distributed.BoundTCPStore`, as `python -m trainers.torchrun`
does for torchrun's agent; the ranks then join with that store. The rest follows Ray Train's torch backend (same environment variables, same timeout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from trainers.distributed import BoundTCPStore

_server: dist.TCPStore | None = None
"""Rank 0's store server, between `serve_store` and `join_process_group` (same worker)."""


def serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """In rank 0's worker: the store server, on this node's address only, on a port the system picks."""
    global _server
    address = ray.util.get_node_ip_address()
    _server = BoundTCPStore(address, 0, world_size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return address, _server.port


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: float) -> None:
    """In every worker: the store (rank 0's server, the others' clients) and the process group."""
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
    if backend == "nccl":  # as Ray Train does: a stuck NCCL collective fails instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        if _server is None:
            raise RuntimeError("rank 0's store was not started in this worker")
        store = _server
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundStoreTorchConfig") -> None:  # noqa: ANN001 (Ray's type)
        address, port = worker_group.execute_single(0, serve_store, world_size=len(worker_group),
                                                    timeout_s=backend_config.timeout_s)
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
