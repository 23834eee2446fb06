"""Attach to a Ray cluster, or start an embedded one on loopback and tear it down afterwards."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from typing import Callable, Iterator

import ray
import ray.data

from cluster.embedded_head import embedded_head
from cluster.head_env import LOOPBACK_ENV
from cluster.shard_sampling import SHARD_TASK_CPUS
from core.config import ClusterSection
from core.errors import UserError


EMBEDDED_JOB_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_DATA_USAGE_DISABLED": "1"}
"""On the embedded (one-machine) cluster, two actors that each cost a process start while the job
starts: Ray Train's preemption watcher (it reports cloud nodes being reclaimed; this node is the
machine the command runs on) and Ray Data's usage-statistics collector (the embedded head already
runs with usage statistics disabled). An attached cluster keeps its own settings."""


def rank_env(section: ClusterSection) -> dict[str, str]:
    """Environment every rank (and Ray Train's controller) gets, wherever Ray places it: the
    collectives' interface, how long a start waits for placement, one malloc arena
    (`one_malloc_arena`), and the driver's SHARDREC_*
    testing aids (batch records, a rank that fails once), which a worker started by a remote node's
    raylet would not otherwise see."""
    aids = {name: value for name, value in os.environ.items() if name.startswith("SHARDREC_")}
    # Read by Ray Train's controller, which runs with the job's environment.
    placement = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(section.placement_timeout_s)}
    return {**aids, **placement, "GLIBC_TUNABLES": one_malloc_arena(os.environ.get("GLIBC_TUNABLES")),
            **section.worker_env()}


def one_malloc_arena(tunables: str | None) -> str:
    """`tunables` (GLIBC_TUNABLES, read when a process starts) with glibc's allocator held to its
    main arena. Ray Train runs the training function in a thread of the worker, and glibc gives
    each thread an arena of its own, made of 64 MB heaps that are unmapped whenever they empty:
    a step's few hundred MB of buffers were faulted in again every step (31,000 minor faults a
    second in a Ray worker against 22 in a torchrun rank, whose training runs on the main
    thread; about 400 in a Ray worker after). In the main arena, `trainers.memory.keep_freed_memory`
    keeps them mapped."""
    setting = "glibc.malloc.arena_max=1"
    kept = [part for part in (tunables or "").split(":") if part and not part.startswith("glibc.malloc.arena_max=")]
    return ":".join([*kept, setting])


def ray_train_cpus(section: ClusterSection) -> float:
    """CPUs a Ray Train job of interaction models needs: each worker's own, and a shard task's for
    each of them (one at a time per rank: RayRankStream.pipeline)."""
    return section.num_workers * (section.cpus_per_worker + SHARD_TASK_CPUS)


def embedded_cpus(section: ClusterSection) -> int:
    """CPUs of an embedded cluster: what the job needs (`ray_train_cpus`), and at least 2."""
    return max(2, math.ceil(ray_train_cpus(section) - 1e-9))


@contextlib.contextmanager
def keeping_python_signal_handlers() -> Iterator[None]:
    """Around ray.init: put this process's Python SIGTERM and SIGINT handlers back afterwards. Ray's
    core worker installs a C++ SIGTERM handler of its own in the driver that logs the signal and
    aborts the process (exit -6) during the clean-up the Python handler starts, so the embedded
    cluster's stop and the run's exit code (143) would be lost."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if callable(handler):
                    signal.signal(signum, handler)


def check_embedded_fits(section: ClusterSection) -> None:
    """Refuse, before an embedded cluster starts, ranks this machine's cores cannot run: the
    embedded cluster would be sized to the request, Ray would place every worker, and they would
    fight over the cores (and the memory) until something is killed."""
    cores = len(os.sched_getaffinity(0))
    needed = ray_train_cpus(section) if section.launcher == "ray_train" else float(section.num_workers)
    if needed > cores + 1e-9:
        raise UserError(f"cluster.num_workers {section.num_workers} needs {needed:g} CPUs on this machine's embedded "
                        f"cluster (cluster.cpus_per_worker {section.cpus_per_worker:g} and a {SHARD_TASK_CPUS:g}-CPU "
                        f"shard task per worker); it has {cores}: use fewer workers, or --cluster.address for a "
                        "larger Ray cluster")


@contextlib.contextmanager
def ray_cluster(section: ClusterSection, log: bool = True,
                while_starting: Callable[[], None] | None = None, cpus: int | None = None) -> Iterator[str]:
    """Yield a description of the cluster in use. An embedded cluster gets its own temp dir (short:
    Ray's socket paths must stay under 108 bytes), a capped object store and is shut down on exit.
    log=False keeps Ray's own logging and the workers' output off this console (it stays in the
    cluster's session logs; shardrec's ranks write theirs under the run folder). `while_starting`
    runs while an embedded head comes up (before connecting to a given address). `cpus`: the
    embedded cluster's CPUs (default: what one job of `section` needs, `embedded_cpus`)."""
    os.environ.update(LOOPBACK_ENV)
    # The driver too: Ray rebuilds the controller's startup-timeout error here, reading the value again.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(section.placement_timeout_s)
    # Our own log lines report progress; Ray Data's live bars flood captured logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if section.address:
        if while_starting is not None:
            while_starting()
        with keeping_python_signal_handlers():
            ray.init(address=section.address, log_to_driver=log, logging_level=logging.INFO if log else logging.WARNING,
                     runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **rank_env(section)}})
        try:
            yield f"attached to Ray cluster at {section.address}"
        finally:
            ray.shutdown()
        return
    cpus = cpus or embedded_cpus(section)
    os.environ.update(EMBEDDED_JOB_ENV)
    with embedded_head(cpus, section.object_store_mb, while_starting=while_starting,
                       dashboard=section.embedded_dashboard) as head:
        with keeping_python_signal_handlers():
            ray.init(
                address=head.gcs_address,
                log_to_driver=log,
                logging_level=logging.INFO if log else logging.WARNING,
                # Ray Train otherwise routes worker print() through its logger as well: every line twice.
                runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **rank_env(section), **EMBEDDED_JOB_ENV}},
            )
        try:
            dashboard = (f"dashboard {head.dashboard_url}" if head.dashboard_url
                         else "no dashboard: cluster.embedded_dashboard")
            yield (f"embedded local Ray cluster ({cpus} CPUs, {section.object_store_mb} MB object store, "
                   f"{head.temp_dir}; free ports on 127.0.0.1, token authentication; {dashboard})")
        finally:
            ray.shutdown()
