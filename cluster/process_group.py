"""Ray Train's torch process group: rank 0's store on its node's address only, set up by a backend
that does not import torch where Ray Train's controller runs it.

- The store. Ray Train's own set-up lets `init_process_group` create rank 0's TCPStore, which
  listens on every interface of the machine (torch takes no bind address): anyone who can reach
  the machine could write keys into a running job's store. Here rank 0's worker serves the store
  on a socket already listening on the address Ray gave its node (127.0.0.1 for shardrec's
  embedded cluster; the cluster interface's address on a multi-host cluster), as
  `python -m trainers.torchrun` does for torchrun's agent (`core.sockets.bound_listener`); the
  ranks then join with that store. Same environment variables as Ray Train's torch backend.
- No torch in the controller. Ray Train's controller process loads the backend config and runs
  the backend's set-up, which sends functions to the workers. Ray's TorchConfig lives in
  `ray.train.torch`, which imports torch: 1.3 s of the controller's CPU on an idle core of the
  2-core machine (3.3 s while other jobs ran), in a start-up where every process wants the same
  2 cores. This module imports no torch: the functions it runs on the workers import it there,
  where the trainer has loaded it anyway. (It uses Ray Train's public Backend API only.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

from core.sockets import bound_listener

SHUTDOWN_TIMEOUT_S = 30
"""How long the backend waits for the workers to leave the process group at the end of a run."""

_server: Any = None
"""Rank 0's store server (a torch TCPStore), between `serve_store` and `join_process_group`."""


def serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """In rank 0's worker: the store server, on this node's address only, on a port the system picks."""
    import torch.distributed as dist  # in the worker (see the module's docstring)

    global _server
    address = ray.util.get_node_ip_address()
    listen_fd, port = bound_listener(address, 0)
    _server = dist.TCPStore(address, port, world_size, True, timeout=timedelta(seconds=timeout_s),
                            wait_for_workers=False, master_listen_fd=listen_fd)
    return address, port


def set_rank_env() -> None:
    """In every worker: torchrun's environment variables, from Ray Train's context."""
    context = ray.train.get_context()
    os.environ.update(LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
                      NODE_RANK=str(context.get_node_rank()), RANK=str(context.get_world_rank()),
                      WORLD_SIZE=str(context.get_world_size()))


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: float) -> None:
    """In every worker: the store (rank 0's server, the others' clients) and the process group."""
    import torch.distributed as dist  # in the worker

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


def leave_process_group() -> None:
    """In every worker, at the end of a run (or of an attempt before a restart)."""
    import torch.distributed as dist  # in the worker

    if dist.is_initialized():
        dist.destroy_process_group()


class _RankGroupBackend(Backend):
    share_cuda_visible_devices = True  # as Ray's torch backend: a node's NCCL ranks see each other's GPUs

    def on_start(self, worker_group: Any, backend_config: "RankGroupConfig") -> None:
        address, port = worker_group.execute_single(0, serve_store, world_size=len(worker_group),
                                                    timeout_s=backend_config.timeout_s)
        worker_group.execute(set_rank_env)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend=backend_config.backend,
                                                  world_rank=rank, world_size=len(worker_group), address=address,
                                                  port=port, timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group: Any, backend_config: "RankGroupConfig") -> None:
        try:
            ray.get(worker_group.execute_async(leave_process_group), timeout=SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            pass  # a worker stuck in a collective: Ray Train stops the workers next anyway


@dataclass
class RankGroupConfig(BackendConfig):
    """Ray Train backend config for shardrec's ranks: `backend` is "gloo" or "nccl"; `timeout_s`
    bounds every collective (Ray's TorchConfig default)."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type:
        return _RankGroupBackend
