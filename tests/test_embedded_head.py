"""The folder of a `shardrec train` run's embedded Ray head: removed by the run, and, when the run was
killed before it could, by a later run once nothing of the old one is alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cluster  # noqa: F401  (Ray's environment, as every run sets it)
from cluster.local_head import (EMBEDDED_PREFIX, OWNER_FILE, embedded_head, process_identity,
                                remove_orphaned_heads, session_processes, stop_session)

REPO = Path(__file__).resolve().parent.parent


def _folder(root: Path, name: str, owner: object) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "session_latest").mkdir()  # a folder with content, as a head leaves it
    if owner is not None:
        (folder / OWNER_FILE).write_text(owner if isinstance(owner, str) else json.dumps(owner))
    return folder


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_only_folders_whose_driver_and_head_are_gone_are_removed(tmp_path):
    ended = subprocess.Popen(["sleep", "60"])
    ended_identity = process_identity(ended.pid)
    ended.kill()
    ended.wait()
    stopping_head = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a head still exiting
    try:
        me = process_identity(os.getpid())
        assert ended_identity is not None and me is not None and process_identity(ended.pid) is None
        orphan = _folder(tmp_path, EMBEDDED_PREFIX + "orphan", {"driver": ended_identity, "head": None})
        reused = _folder(tmp_path, EMBEDDED_PREFIX + "reused", {"driver": [me[0], me[1] - 1], "head": None})
        kept = {
            "live driver": _folder(tmp_path, EMBEDDED_PREFIX + "live", {"driver": me, "head": None}),
            "head still stopping": _folder(tmp_path, EMBEDDED_PREFIX + "stopping",
                                           {"driver": ended_identity, "head": stopping_head.pid}),
            "no owner record (being made)": _folder(tmp_path, EMBEDDED_PREFIX + "new", None),
            "unreadable owner record": _folder(tmp_path, EMBEDDED_PREFIX + "bad", "{not json"),
            "not an embedded head's name": _folder(tmp_path, "ray-other", {"driver": ended_identity, "head": None}),
        }
        assert sorted(remove_orphaned_heads(tmp_path)) == sorted([orphan, reused])
        assert not orphan.exists() and not reused.exists()  # a reused pid is not its driver
        for why, folder in kept.items():
            assert folder.exists(), why
        stopping_head.kill()
        stopping_head.wait()
        assert remove_orphaned_heads(tmp_path) == [kept["head still stopping"]]
    finally:
        stopping_head.kill()
        stopping_head.wait()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_killed_drivers_head_stops_and_the_next_run_removes_its_folder():
    driver = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom cluster.local_head import embedded_head\n"
                               "with embedded_head(1, 100) as head:\n    print(head.temp_dir, flush=True)\n"
                               "    time.sleep(300)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    head_pid = None
    try:
        folder = Path(driver.stdout.readline().strip())
        assert folder.name.startswith(EMBEDDED_PREFIX), f"no head came up (exit {driver.poll()})"
        head_pid = json.loads((folder / OWNER_FILE).read_text())["head"]
        assert session_processes(head_pid), "the head's processes are not in its session"
        driver.send_signal(signal.SIGKILL)  # no clean-up of its own runs
        driver.wait()
        deadline = time.monotonic() + 60
        while session_processes(head_pid):  # the head stops by itself: it is told its parent died
            assert time.monotonic() < deadline, "the killed driver's head is still running"
            time.sleep(0.5)
        assert folder.exists()  # what the driver could not remove
        with embedded_head(1, 100) as next_head:  # the next run's head
            assert not folder.exists() and next_head.temp_dir.exists()
        assert not next_head.temp_dir.exists()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if head_pid is not None:
            stop_session(head_pid, grace_s=0.0)
