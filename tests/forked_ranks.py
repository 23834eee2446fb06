"""Run a function on N gloo ranks, each a process forked from a fork server (about 0.2 s per launch,
versus ~10 s for a freshly spawned interpreter).

The ranks are not forked from the test process itself: by the time a test runs, that process holds
threads and objects of earlier tests (an in-process export's gloo group and its threads, a pool),
and a child of it can block forever on a lock or a thread its copy refers to but that does not exist
there. The fork server is a process that has only imported the stack, so every rank starts warm and
clean. `fn` and its arguments therefore go by pickle: `fn` is a module-level function. A rank that
raises sends its traceback back; any failure or timeout kills every rank, so a test never hangs in a
collective.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import queue as queue_module
import shutil
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from trainers.distributed import free_loopback_port


# What every rank imports anyway, imported once in the fork server.
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torchrec", "fbgemm_gpu", "pyarrow.parquet", "tests.conftest",
                                 "trainers.sharded_model", "trainers.trainer", "trainers.evaluate"])


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, queue: Any, args: tuple,
           stacks_after_s: float, stacks_file: str) -> None:
    torch.set_num_threads(1)
    # A rank that is still running when the parent is about to give up writes every thread's stack
    # to a file the parent shows with the failure: a hang then says where it hangs.
    stacks = open(stacks_file, "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(stacks_after_s, exit=False, file=stacks)
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
    queue = _CONTEXT.Queue()
    port = free_loopback_port()
    stacks_dir = Path(tempfile.mkdtemp(prefix="rank-stacks-"))
    processes = [_CONTEXT.Process(target=_child, args=(fn, rank, world, port, queue, args, max(timeout - 10, 1),
                                                       str(stacks_dir / f"rank-{rank}.txt")))
                 for rank in range(world)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                stacks = "\n".join(f"rank {r}:\n{(stacks_dir / f'rank-{r}.txt').read_text()}" for r in range(world)
                                   if r not in results and (stacks_dir / f"rank-{r}.txt").is_file())
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(results))} did not finish within "
                                     f"{timeout:.0f} s; their stacks:\n{stacks}") from None
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        shutil.rmtree(stacks_dir, ignore_errors=True)
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
