"""The embedded cluster of `shardrec train` (`embedded_head`).

`ray start --head --block` with every port Ray would otherwise take by default (GCS 6379, dashboard
8265, dashboard agent 52365, metrics 44217/44227, ...) set to a free port on 127.0.0.1, and token
authentication. Any number of runs and a user's own `ray start --head` share a machine. Ray's
dashboard is started without its modules (`--include-dashboard false`) unless asked for
(`cluster.embedded_dashboard`): its nine module processes took 0.04 of a core while idle and their
start-up CPU, on the ranks' cores, and a run of its own uses none of them (no job API, no state
query: `upstream.ray_private.RankTrainer`). Ray still runs the dashboard's bare process and records its address
in the head's GCS, so a state query addressed to this head fails with Ray's "ServerUnavailable".
(A query given no address goes to whichever cluster Ray finds on the machine, with or without a
dashboard here.) The autoscaler's monitor is left out: a fixed-size local cluster has no node to
add or remove. The head runs in a session of its own (cluster/head_session.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cluster.head_env import RAY, ensure_private_token, ray_env
from cluster.head_session import (SESSION_GRACE_S, distinct_free_ports, process_identity, make_private,
                                   remove_tree, session_processes, stop_session, stop_with_parent)


EMBEDDED_ROOT = Path("/tmp")  # short: Ray's socket paths under it stay < 108 bytes
EMBEDDED_PREFIX = "shardrec-ray-"
OWNER_FILE = "shardrec-owner.json"
"""In an embedded head's temp dir: the (pid, start time) of the driver that made it and of the head's
`ray start --block`, whose pid is the head's session. A driver ended by SIGKILL runs no clean-up: its
head stops by itself (it is told when its parent dies) but leaves its folder, which a later run
removes once no owner is alive (`remove_orphaned_heads`)."""



def _write_owner(temp_dir: Path, head_pid: int | None) -> None:
    owner = {"driver": process_identity(os.getpid()), "head": head_pid}
    staging = temp_dir / (OWNER_FILE + ".tmp")
    staging.write_text(json.dumps(owner))
    staging.replace(temp_dir / OWNER_FILE)  # a reader sees the old record or the new, never half


def remove_orphaned_heads(root: Path = EMBEDDED_ROOT) -> list[Path]:
    """Remove this user's embedded-head folders under `root` whose driver has ended and whose head
    has no process left; returns them. A folder without a readable owner record (being made right
    now, or not shardrec's) is left alone, and so is any other user's."""
    removed = []
    for folder in root.glob(EMBEDDED_PREFIX + "*"):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            if folder.stat().st_uid != os.getuid():
                continue
            owner = json.loads((folder / OWNER_FILE).read_text())
            driver, head = owner["driver"], owner["head"]
            if not driver or process_identity(int(driver[0])) == [int(driver[0]), int(driver[1])]:
                continue  # its run is still going (or its driver could not be told)
            if head is not None and session_processes(int(head)):
                continue  # its head is still stopping
            remove_tree(folder)
            if not folder.exists():
                removed.append(folder)
    return removed


def _wait_for_address(temp_dir: Path, process: subprocess.Popen, timeout_s: float) -> str:
    """`ray start` writes the GCS address to TEMP_DIR/ray_current_cluster once the head is up."""
    marker = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            return marker.read_text().strip()
        if process.poll() is not None:
            log = (temp_dir / "ray-start.log")
            raise RuntimeError(f"ray start exited with {process.returncode}: "
                               f"{log.read_text()[-2000:] if log.is_file() else ''}")
        time.sleep(0.2)
    raise RuntimeError(f"the Ray head in {temp_dir} did not come up within {timeout_s:.0f} s")


@dataclass
class EmbeddedHead:
    gcs_address: str
    temp_dir: Path
    dashboard_url: str | None = None
    """Ray's dashboard, when the head was started with it."""


@contextlib.contextmanager
def embedded_head(num_cpus: int, object_store_mb: int, timeout_s: float = 120.0,
                  while_starting: Callable[[], None] | None = None, dashboard: bool = False) -> Iterator[EmbeddedHead]:
    """A private single-node Ray cluster on 127.0.0.1 for the duration (see the module docstring).
    `while_starting` runs once `ray start` is launched and before the head is waited for (the
    caller's own start-up work overlaps the head's); if it raises, the head is stopped. `dashboard`:
    Ray's dashboard with its modules (state API, job API, web UI), for a user watching the run."""
    remove_orphaned_heads()
    temp_dir = Path(tempfile.mkdtemp(prefix=EMBEDDED_PREFIX, dir=EMBEDDED_ROOT))
    _write_owner(temp_dir, head_pid=None)  # before the head exists: a driver killed now is seen too
    flags = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
    free = distinct_free_ports(len(flags) + 2)  # Ray refuses a port given to two of its components
    ports = dict(zip(flags, free))
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--object-store-memory", str(object_store_mb * 1024 * 1024),
               "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    # The autoscaler's monitor (a Python process, 0.4 s of CPU in a start-up that is CPU-bound on 2
    # cores) has nothing to do on a fixed-size local cluster: there is no node to add or remove.
    command.append("--no-monitor")
    if not dashboard:
        command += ["--include-dashboard", "false"]
    env = ray_env()
    # Two more fixed ports (autoscaler and dashboard metrics), set only through the environment.
    env.update(AUTOSCALER_METRIC_PORT=str(free[-2]), DASHBOARD_METRIC_PORT=str(free[-1]))
    # Ray starts idle worker processes when the first driver connects. In a `shardrec train` run no
    # task or actor ever ran on them (the session's logs), so they only took CPU from the start-up:
    # two process starts on 2 cores, while Ray Train's controller starts.
    env["RAY_prestart_worker_first_driver"] = "0"
    ensure_private_token()
    log = (temp_dir / "ray-start.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                               preexec_fn=stop_with_parent)
    _write_owner(temp_dir, head_pid=process.pid)
    address = ""
    try:
        if while_starting is not None:
            while_starting()
        address = _wait_for_address(temp_dir, process, timeout_s)
        make_private(temp_dir)
        url = f"http://127.0.0.1:{ports['--dashboard-port']}" if dashboard else None
        yield EmbeddedHead(address, temp_dir, url)
    finally:
        # Nothing in a private cluster outlives its driver's use of it (runs write their results to
        # the run folder), so every process of its session is stopped at once. Stopping `ray start
        # --block` alone and waiting for it took about 40 s of every run's end: it waits for Ray's
        # agents, and they linger on SIGTERM.
        # A head that never came up (the caller's start-up work refused the job) has nothing to
        # finish: it is killed at once rather than given the grace its half-started agents ignore.
        stop_session(process.pid, grace_s=SESSION_GRACE_S if address else 0.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        log.close()
        remove_tree(temp_dir)
        if temp_dir.exists():  # a process still writing into it: the next run's start removes it
            with contextlib.suppress(OSError):
                _write_owner(temp_dir, head_pid=process.pid)


# --- a head for `ray job submit` -------------------------------------------------------------------
