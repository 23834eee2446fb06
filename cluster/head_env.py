"""The environment and credentials of the Ray heads shardrec starts (cluster/embedded_head.py,
cluster/job_head.py): loopback addresses, quick detection of lost nodes, idle workers kept, and a
private token file."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from pathlib import Path

from core.errors import UserError


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
