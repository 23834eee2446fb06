"""Ray heads on this machine that shardrec starts and stops itself.

- The embedded cluster of `shardrec train` (`embedded_head`): `ray start --head --block` with every
  port Ray would otherwise take by default (GCS 6379, dashboard 8265, dashboard agent 52365, metrics
  44217/44227, ...) set to a free port on 127.0.0.1, and token authentication. Any number of runs and
  a user's own `ray start --head` share a machine. Ray's dashboard is started without its modules
  (`--include-dashboard false`) unless asked for (`cluster.embedded_dashboard`): its nine module
  processes took 0.04 of a core while idle and their start-up CPU, on the ranks' cores, and a run
  of its own uses none of them (no job API, no state query: `cluster.rank_trainer`). Ray still runs
  the dashboard's bare process and records its address in the head's GCS, so a state query
  addressed to this head fails with Ray's "ServerUnavailable". (A query given no address goes to
  whichever cluster Ray finds on the machine, with or without a dashboard here: an earlier release
  found Ray Train's placement-group cleaner asking another cluster about a run's controller.) The
  autoscaler's monitor is left out: a fixed-size local cluster has no node to add or remove.
- A head for `ray job submit` (`shardrec cluster start|wait|stop`): Ray's default ports on
  127.0.0.1, token authentication on, the job agent waited for, and shardrec's own executables on
  the jobs' PATH.

Each head is started as a new session (`setsid`): every process Ray then starts for it, agents and
workers included, stays in that session, and a head is stopped by signalling its session's
processes and nothing else (Ray's agents rename their command lines and outlive their raylet for
minutes, so names and parents do not find them). `ray stop` would end every Ray cluster of the
user on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from core.errors import UserError
from trainers.distributed import free_loopback_port
from trainers.run_log import proc_stat_fields, process_start_ticks

RAY = str(Path(sys.executable).parent / "ray")
STATE_DIR = Path.home() / ".shardrec" / "clusters"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray picks the machine's external address unless told otherwise; on loopback-only runs that makes
clients hang without an error."""
NODE_HEALTH_ENV = {"RAY_health_check_period_ms": "2000", "RAY_health_check_timeout_ms": "2000",
                   "RAY_health_check_failure_threshold": "5"}
"""How fast the head's control service declares a silent node dead, read when the head starts. Ray's
defaults (a check every 3 s, each allowed 10 s, 5 misses) took 67 s for a host whose network went
away, and a job waits that long before it restarts or ends; these take 10-20 s. A node that misses
5 checks in a row is gone by any standard, so a loaded node is not mistaken for a lost one."""


IDLE_WORKER_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "600000"}
"""How long the head keeps a worker process it no longer needs (beyond one per CPU). Ray's default is
1 s: a run's Ray Data tasks end within its first epoch, their workers were killed a second later,
and each exit (Python and Ray's core worker shutting down, about 0.3 s of CPU) ran beside the ranks:
on 2 CPUs the epoch it fell in trained 25-35% slower, and the next shard task had to start a new
worker. Kept 10 minutes, a worker is reused by the next task; the cluster's end stops it anyway.
A value the user's environment sets wins."""


def ray_env() -> dict[str, str]:
    """The environment for a head we start: loopback, lost nodes detected quickly, idle workers kept,
    and our executables first on PATH (a job's entrypoint `shardrec ...` must resolve to this
    installation)."""
    env = {**IDLE_WORKER_ENV, **os.environ, **LOOPBACK_ENV, **NODE_HEALTH_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def token_path() -> Path:
    """Where Ray's clients and heads look for the token file."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ensure_private_token() -> None:
    """A token file for a head about to start, made private (0600): it is a password to the cluster.
    With RAY_AUTH_MODE=token set (cluster/__init__.py sets it), `ray start --head` refuses to make
    the token itself (it does so only while the mode is unset), so on a machine where Ray never ran
    every head failed to start. Made as Ray makes its own, 256 random bits in hex; an existing
    token is kept (only its mode is tightened: Ray writes it 0644), and so is RAY_AUTH_TOKEN."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    if path.is_file():
        with contextlib.suppress(OSError):
            if path.stat().st_uid == os.getuid():
                path.chmod(0o600)
        return
    # Written whole under a name of this process's, then linked into place: of two runs starting at
    # once, the second finds the first one's complete token (a link never replaces a file).
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as token:
            token.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
    except OSError as error:
        raise UserError(f"cannot make Ray's token file {path} ({error.strerror or error}); set "
                        "RAY_AUTH_TOKEN_PATH to a writable file, or RAY_AUTH_TOKEN to the cluster's token") from error
    finally:
        with contextlib.suppress(OSError):
            draft.unlink()


def session_processes(session: int) -> list[int]:
    """Pids of the live processes in session `session` (field 6 of /proc/<pid>/stat), this one
    excluded. Zombies are not counted: they have exited, and only their parent's wait removes them
    (a stop that waited for them ran out its timeouts, 8 s)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = proc_stat_fields(int(entry.name))
                if int(fields[3]) == session and fields[0] != "Z":
                    found.append(int(entry.name))
    return found


def distinct_free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on 127.0.0.1 right now. Ports picked one at a time can
    repeat (each probe's socket is closed before the next), and `ray start` then fails with "port
    ... used by other components"."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_loopback_port()
        if port not in ports:
            ports.append(port)
    return ports


SESSION_GRACE_S = 3.0
"""How long a private head's processes get between SIGTERM and SIGKILL when it is stopped."""


def stop_session(session: int, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, to every process of a head's session. A head stopped
    while it is still starting keeps spawning processes for a moment: each poll signals the ones
    that appeared since."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        signalled: set[int] = set()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            alive = session_processes(session)
            if not alive:
                return
            for pid in set(alive) - signalled:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
                signalled.add(pid)
            time.sleep(0.2)


def _stop_with_parent() -> None:
    """In the `ray start --block` child: SIGTERM when the process that started it dies, even by
    SIGKILL, so an embedded cluster never outlives its driver (`ray start --block` stops what it
    started on SIGTERM)."""
    import ctypes  # Linux prctl, only in this child

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def remove_tree(path: Path, tries: int = 5) -> None:
    """Remove a head's temp dir; processes that were still exiting may write a last log file."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.5)


EMBEDDED_ROOT = Path("/tmp")  # short: Ray's socket paths under it stay < 108 bytes
EMBEDDED_PREFIX = "shardrec-ray-"
OWNER_FILE = "shardrec-owner.json"
"""In an embedded head's temp dir: the (pid, start time) of the driver that made it and of the head's
`ray start --block`, whose pid is the head's session. A driver ended by SIGKILL runs no clean-up: its
head stops by itself (it is told when its parent dies) but leaves its folder, which a later run
removes once no owner is alive (`remove_orphaned_heads`)."""


def process_identity(pid: int) -> list[int] | None:
    """[pid, start time in clock ticks since boot] of a live process, or None: a pid alone may be
    reused by another process once its owner is gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        if proc_stat_fields(pid)[0] != "Z":
            return [pid, process_start_ticks(pid)]
    return None


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
                               preexec_fn=_stop_with_parent)
    _write_owner(temp_dir, head_pid=process.pid)
    address = ""
    try:
        if while_starting is not None:
            while_starting()
        address = _wait_for_address(temp_dir, process, timeout_s)
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


def _state_file(dashboard_port: int) -> Path:
    return STATE_DIR / f"head-{dashboard_port}.json"


DASHBOARD_FAILED = "Failed to start the dashboard"
"""What `ray start` logs, and then exits 0, when its dashboard (the job API) did not come up."""


class HeadDidNotStart(RuntimeError):
    """A head for jobs that `ray start` launched but that never accepted a job; it has been stopped."""


def start_job_head(dashboard_port: int = 8265, port: int = 6379, num_cpus: int | None = None,
                   object_store_mb: int = 512, timeout_s: float = 120.0, attempts: int = 2) -> str:
    """`ray start --head` on 127.0.0.1 with token authentication, waited for until it accepts jobs.
    Returns the job-submission address.

    A head whose dashboard never came up (Ray's dashboard gives each of its module processes 30 s
    to start, which a loaded machine can miss, and then hangs without serving its port) is stopped
    and started again, up to `attempts` times in all; the last failure is raised with the end of
    the dashboard's log."""
    url = f"http://127.0.0.1:{dashboard_port}"
    if _state_file(dashboard_port).exists():
        raise UserError(f"a head started by shardrec already serves {url}; `shardrec cluster stop "
                        f"--dashboard-port {dashboard_port}` first")
    for wanted, what in ((dashboard_port, "dashboard"), (port, "GCS")):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", wanted)) == 0:
                raise UserError(f"port {wanted} ({what}) is already in use on 127.0.0.1; choose another")
    temp_dir = Path(f"/tmp/shardrec-head-{dashboard_port}")
    command = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--object-store-memory", str(object_store_mb * 1024 * 1024), "--temp-dir", str(temp_dir),
               "--disable-usage-stats"]
    if num_cpus:
        command += ["--num-cpus", str(num_cpus)]
    env = ray_env()
    env.setdefault("RAY_AUTH_MODE", "token")
    ensure_private_token()
    for attempt in range(1, attempts):
        try:
            _start_job_head_once(command, env, temp_dir, url, dashboard_port, port, timeout_s)
            return url
        except HeadDidNotStart as exc:
            print(f"shardrec: {exc}\nshardrec: starting the head again (attempt {attempt + 1} of {attempts})",
                  file=sys.stderr, flush=True)
    _start_job_head_once(command, env, temp_dir, url, dashboard_port, port, timeout_s)
    return url


def _start_job_head_once(command: list[str], env: dict[str, str], temp_dir: Path, url: str, dashboard_port: int,
                         port: int, timeout_s: float) -> None:
    shutil.rmtree(temp_dir, ignore_errors=True)
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
    if process.returncode != 0:  # a refused flag or port: starting again would fail the same way
        stop_job_head(dashboard_port)
        raise RuntimeError(f"ray start failed ({process.returncode}): {stderr[-2000:] or stdout[-2000:]}")
    try:
        if DASHBOARD_FAILED in stdout + stderr:
            raise RuntimeError(f"`ray start` says: {DASHBOARD_FAILED}")
        wait_for_jobs(url, timeout_s)
    except RuntimeError as exc:
        raise _stopped(dashboard_port, temp_dir, str(exc)) from None


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
