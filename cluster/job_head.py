"""A head for `ray job submit` (`shardrec cluster start|wait|stop`): Ray's default ports on
127.0.0.1, token authentication on, the job agent waited for, and shardrec's own executables on the
jobs' PATH. Its state (address, temp dir, session) is kept under STATE_DIR so that `stop` finds it;
it runs in a session of its own (cluster/head_session.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.errors import UserError
from cluster.head_env import RAY, STATE_DIR, ensure_private_token, ray_env
from cluster.head_session import make_private, remove_tree, stop_session


def _state_file(dashboard_port: int) -> Path:
    return STATE_DIR / f"head-{dashboard_port}.json"


DASHBOARD_FAILED = "Failed to start the dashboard"
"""What `ray start` logs, and then exits 0, when its dashboard (the job API) did not come up."""

NODE_TIMED_OUT = "timed out during startup"
"""What `ray start` says, exiting 1, when its raylet did not register with the GCS within Ray's fixed
30 s: on a loaded machine a second start usually succeeds."""


class HeadDidNotStart(RuntimeError):
    """A head for jobs that `ray start` launched but that never accepted a job; it has been stopped."""


def start_job_head(dashboard_port: int = 8265, port: int = 6379, num_cpus: int | None = None,
                   object_store_mb: int = 512, timeout_s: float = 120.0, attempts: int = 2) -> str:
    """`ray start --head` on 127.0.0.1 with token authentication, waited for until it accepts jobs.
    Returns the job-submission address.

    A head whose dashboard never came up (Ray's dashboard gives each of its module processes 30 s
    to start, which a loaded machine can miss, and then hangs without serving its port), or whose
    raylet did not register within Ray's 30 s, is stopped and started again, up to `attempts`
    times in all; the last failure is raised with the end of the dashboard's log."""
    url = f"http://127.0.0.1:{dashboard_port}"
    if _state_file(dashboard_port).exists():
        raise UserError(f"a head started by shardrec already serves {url}; `shardrec cluster stop "
                        f"--dashboard-port {dashboard_port}` first")
    for wanted, what in ((dashboard_port, "dashboard"), (port, "GCS")):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", wanted)) == 0:
                raise UserError(f"port {wanted} ({what}) is already in use on 127.0.0.1; choose another")
    command = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--object-store-memory", str(object_store_mb * 1024 * 1024), "--disable-usage-stats"]
    if num_cpus:
        command += ["--num-cpus", str(num_cpus)]
    env = ray_env()
    env.setdefault("RAY_AUTH_MODE", "token")
    ensure_private_token()
    for attempt in range(1, attempts):
        try:
            _start_job_head_once(command, env, url, dashboard_port, port, timeout_s)
            return url
        except HeadDidNotStart as exc:
            print(f"shardrec: {exc}\nshardrec: starting the head again (attempt {attempt + 1} of {attempts})",
                  file=sys.stderr, flush=True)
    _start_job_head_once(command, env, url, dashboard_port, port, timeout_s)
    return url


def _start_job_head_once(command: list[str], env: dict[str, str], url: str, dashboard_port: int,
                         port: int, timeout_s: float) -> None:
    # A folder of this start's own (mode 0700, a name no one can plant beforehand), recorded in the
    # head's state below: `stop` removes exactly that one.
    temp_dir = Path(tempfile.mkdtemp(prefix=f"shardrec-head-{dashboard_port}-", dir="/tmp"))
    command = [*command, "--temp-dir", str(temp_dir)]
    # A new session: the daemons `ray start` leaves behind keep its session id, which `stop` signals.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    # Recorded at once, so that every way this start can fail stops the head the same way (and a
    # start interrupted from here on is still stopped by `shardrec cluster stop`).
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    _state_file(dashboard_port).write_text(json.dumps({"temp_dir": str(temp_dir), "address": url, "gcs_port": port,
                                                       "session": process.pid}))
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        failure = _stopped(dashboard_port, temp_dir, f"`ray start` did not return within {timeout_s:.0f} s")
        process.communicate()
        raise failure from None
    if process.returncode != 0 and NODE_TIMED_OUT in stdout + stderr:
        raise _stopped(dashboard_port, temp_dir, f"`ray start` says: the node {NODE_TIMED_OUT}")
    if process.returncode != 0:  # a refused flag or port: starting again would fail the same way
        stop_job_head(dashboard_port)
        raise RuntimeError(f"ray start failed ({process.returncode}): {stderr[-2000:] or stdout[-2000:]}")
    try:
        if DASHBOARD_FAILED in stdout + stderr:
            raise RuntimeError(f"`ray start` says: {DASHBOARD_FAILED}")
        wait_for_jobs(url, timeout_s)
    except RuntimeError as exc:
        raise _stopped(dashboard_port, temp_dir, str(exc)) from None
    make_private(temp_dir)


def _stopped(dashboard_port: int, temp_dir: Path, why: str) -> HeadDidNotStart:
    """Stop a head that never accepted a job (no grace: it has nothing to finish) and say why, with
    the end of its dashboard's log, read before the stop removes it."""
    why += _dashboard_log_tail(temp_dir)
    stop_job_head(dashboard_port, grace_s=0.0)
    return HeadDidNotStart(f"{why}\n(that head has been stopped)")


def _dashboard_log_tail(temp_dir: Path, lines: int = 12) -> str:
    """The last lines of the head's dashboard log, where Ray writes why its job API did not start
    (its stderr file where the log is empty: the dashboard failed before its logger was set up)."""
    for name in ("dashboard.log", "dashboard.err"):
        path = temp_dir / "session_latest" / "logs" / name
        with contextlib.suppress(OSError):
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
            if tail:
                return f"\nthe end of the head's {name}:\n" + "\n".join(tail)
    return ""


def wait_for_jobs(url: str, timeout_s: float = 120.0) -> None:
    """Wait until the head runs jobs: `ray start` returns before its job agent is up, and a submit
    then fails with "No available agent". A no-op job is submitted until one succeeds."""
    from ray.job_submission import JobStatus, JobSubmissionClient  # Ray's job client: heavy, only here

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(url)
            job = client.submit_job(entrypoint="true", submission_id=f"shardrec-ready-{time.time_ns()}")
            while time.monotonic() < deadline:
                status = client.get_job_status(job)
                if status == JobStatus.SUCCEEDED:
                    return
                if status in (JobStatus.FAILED, JobStatus.STOPPED):
                    last = f"readiness job {status.value}"
                    break
                time.sleep(0.5)
        except Exception as exc:  # connection refused, "No available agent", ...: not ready yet
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        time.sleep(1.0)
    raise RuntimeError(f"the Ray head at {url} did not accept jobs within {timeout_s:.0f} s ({last})")


def stop_job_head(dashboard_port: int = 8265, grace_s: float = 15.0) -> str:
    """Stop a head started by `start_job_head`, by its own processes only (SIGKILL after `grace_s`)."""
    state_file = _state_file(dashboard_port)
    if not state_file.is_file():
        raise UserError(f"no head started by shardrec serves port {dashboard_port} (nothing in {STATE_DIR})")
    state = json.loads(state_file.read_text())
    temp_dir = Path(state["temp_dir"])
    stop_session(int(state["session"]), grace_s=grace_s)
    remove_tree(temp_dir)
    state_file.unlink()
    return state["address"]
