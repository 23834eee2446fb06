"""Start-up work of the Ray path that does not depend on the data, moved off the first step's way.

Timed on the 2-core machine (`shardrec train`, ML-100K, a fresh embedded cluster, timestamps from
the driver, the ranks, the shard tasks and Ray Train's controller log):
- a rank's first pipeline waited about 2 s for its first shard task: the task's worker process had
  to start and import Ray and the shard sampler;
- Ray Data's first execution on a cluster starts two helper actors (its stats and its autoscaling
  coordinator), each a new process: 2.2 s for the first execution, 0.07 s for the next.
So the driver starts Ray Data's helpers before Ray Train starts (a one-row dataset that runs no
task; the actors come up while Ray Train's controller does), and each rank, as its body starts,
boots the worker process its shard tasks will run on (while it builds its model). Task workers are
not shared between the driver and the ranks (Ray Train runs the ranks with a runtime environment of
its own), so only the rank can boot its own.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import ray
import ray.data

from cluster.shard_sampling import SHARD_TASK_CPUS  # also what a task worker booted here has imported


def start_ray_data_helpers(say: Callable[[str], None]) -> None:
    """Have Ray Data start its per-cluster helper actors now, without waiting for them. A failure
    only costs the time this would have saved: it is reported and the job goes on. Ray Data's own
    lines about this one-row dataset (its progress-bar notice, "execution finished") are kept off
    the console, which shows shardrec's lines and errors only."""
    ray_data_log = logging.getLogger("ray.data")
    level = ray_data_log.level
    ray_data_log.setLevel(logging.ERROR)
    try:
        ray.data.from_items([{"row": 0}]).take_all()  # no task: the rows are already in the driver
    except Exception as error:  # noqa: BLE001 (whatever failed, the ranks' first pipelines start them)
        say(f"warning: Ray Data's helpers did not start ahead of training ({error}); "
            "the ranks' first batches will come a few seconds later")
    finally:
        ray_data_log.setLevel(level)


@ray.remote(num_cpus=SHARD_TASK_CPUS)  # the shard tasks' own size
def _import_shard_sampler() -> int:
    """Runs in a new task worker, which imports this module, and with it the shard sampler."""
    return os.getpid()


def boot_shard_task_worker() -> ray.ObjectRef:
    """From a rank: start (without waiting) a task worker of this rank's that has imported the
    shard sampler; Ray hands it the rank's first shard task. Keep the reference until then."""
    return _import_shard_sampler.remote()
