"""The processes of a Ray head that shardrec started, found and stopped by their session.

Each head is started as a new session (`setsid`): every process Ray then starts for it, agents and
workers included, stays in that session, and a head is stopped by signalling its session's
processes and nothing else (Ray's agents rename their command lines and outlive their raylet for
minutes, so names and parents do not find them). `ray stop` would end every Ray cluster of the
user on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import time
from pathlib import Path

from trainers.distributed import free_loopback_port
from trainers.run_log import proc_stat_fields, process_start_ticks


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


def stop_with_parent() -> None:
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



def make_private(tree: Path) -> None:
    """A head's folder for its owner alone: the folder itself 0700 (Ray opens it to 0755 when it
    starts), and group and other write permission off everything Ray made in it (parts of its
    session tree are 0777, where another local user could plant files the head's workers run)."""
    for folder, subfolders, files in os.walk(tree):
        for name in [folder, *(os.path.join(folder, entry) for entry in subfolders + files)]:
            with contextlib.suppress(OSError):
                mode = os.lstat(name).st_mode
                if mode & 0o022 and not stat.S_ISLNK(mode):
                    os.chmod(name, stat.S_IMODE(mode) & ~0o022)
    with contextlib.suppress(OSError):
        os.chmod(tree, 0o700)


def process_identity(pid: int) -> list[int] | None:
    """[pid, start time in clock ticks since boot] of a live process, or None: a pid alone may be
    reused by another process once its owner is gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        if proc_stat_fields(pid)[0] != "Z":
            return [pid, process_start_ticks(pid)]
    return None
