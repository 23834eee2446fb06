"""Attach to a Ray cluster, or start an embedded one on loopback and tear it down afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Iterator

import ray
import ray.data

from core.config import ClusterSection

# Ray picks the machine's external address unless told otherwise; on loopback-only runs that makes
# clients hang without an error. Every Ray call we make goes through here, so set it once.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def ray_cluster(section: ClusterSection, log: bool = True) -> Iterator[str]:
    """Yield a description of the cluster in use. An embedded cluster gets its own temp dir (short:
    Ray's socket paths must stay under 108 bytes), a capped object store and is shut down on exit.
    log=False keeps Ray's own logging and the workers' output off this console (it stays in the
    cluster's session logs; shardrec's ranks write theirs under the run folder)."""
    os.environ.update(LOOPBACK_ENV)
    # Our own log lines report progress; Ray Data's live bars flood captured logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if section.address:
        ray.init(address=section.address, log_to_driver=log, logging_level=logging.INFO if log else logging.WARNING)
        try:
            yield f"attached to Ray cluster at {section.address}"
        finally:
            ray.shutdown()
        return
    temp_dir = tempfile.mkdtemp(prefix="shardrec-ray-", dir="/tmp")
    cpus = max(2, int(section.num_workers * section.cpus_per_worker + 1.999))
    ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=section.object_store_mb * 1024 * 1024,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls; without
        # it the cleaner logs a warning every few seconds.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=log,
        logging_level=logging.INFO if log else logging.WARNING,
        # Ray Train otherwise routes worker print() through its logger as well: every line twice.
        runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
    )
    try:
        yield f"embedded local Ray cluster ({cpus} CPUs, {section.object_store_mb} MB object store, {temp_dir})"
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
