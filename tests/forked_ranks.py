"""Run a function on N gloo ranks in forked processes (about 0.2 s per launch, versus ~10 s spawned).

The parent has already imported torch/torchrec, so children start warm. A rank that raises sends its
traceback back; any failure or timeout kills every rank, so a test never hangs in a collective.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import traceback
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from trainers.distributed import free_loopback_port


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, queue: Any, args: tuple,
           stacks_after_s: float) -> None:
    torch.set_num_threads(1)
    # A rank that is still running when the parent is about to give up prints every thread's stack
    # to stderr (shown with the failed test): a hang then says where it hangs.
    faulthandler.dump_traceback_later(stacks_after_s, exit=False)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        result = fn(rank, world, *args)
        dist.barrier()
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """fn(rank, world, *args) on each rank; returns results by rank or raises with the failing traceback."""
    context = mp.get_context("fork")
    queue = context.Queue()
    port = free_loopback_port()
    processes = [context.Process(target=_child, args=(fn, rank, world, port, queue, args, max(timeout - 10, 1)))
                 for rank in range(world)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, payload = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return [results[rank] for rank in range(world)]


def train_step(sharded: Any, global_batch: dict[str, Any], rank: int, world: int) -> float:
    """One optimizer step on this rank's contiguous slice of a global batch (numpy columns); returns
    this rank's own loss on its slice. The mean of the ranks' losses is the global batch's loss when
    slices are equal: the test averages them itself, so a wrong reduction cannot hide."""
    size = len(next(iter(global_batch.values())))
    mine = slice(rank * size // world, (rank + 1) * size // world)
    loss = sharded.dmp({name: torch.as_tensor(values[mine]) for name, values in global_batch.items()})
    sharded.optimizer.zero_grad()
    loss.backward()
    sharded.optimizer.step()
    return float(loss)


def mean_over_ranks(per_rank: list[list[float]]) -> np.ndarray:
    """[rank][step] losses -> the global loss per step (equal slices: the plain mean)."""
    return np.mean(np.array(per_rank), axis=0)
