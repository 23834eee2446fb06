"""The folder of a `shardrec train` run's embedded Ray head: removed by the run, and, when the run was
killed before it could, by a later run once nothing of the old one is alive."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cluster  # noqa: F401  (Ray's environment, as every run sets it)
from cluster.embedded_head import EMBEDDED_PREFIX, OWNER_FILE, embedded_head, remove_orphaned_heads
from cluster.head_session import process_identity, session_processes, stop_session

REPO = Path(__file__).resolve().parent.parent


def _folder(root: Path, name: str, owner: object) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "session_latest").mkdir()  # a folder with content, as a head leaves it
    if owner is not None:
        (folder / OWNER_FILE).write_text(owner if isinstance(owner, str) else json.dumps(owner))
    return folder


@pytest.mark.slow
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
        [sys.executable, "-c", "import time\nfrom cluster.embedded_head import embedded_head\n"
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
            # private: the folder is its owner's alone, and nothing Ray made in it is writable by others
            assert stat.S_IMODE(next_head.temp_dir.stat().st_mode) == 0o700
            shared = [path for path in next_head.temp_dir.rglob("*")
                      if not path.is_symlink() and path.lstat().st_mode & 0o022]
            assert not shared, shared[:5]
        assert not next_head.temp_dir.exists()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if head_pid is not None:
            stop_session(head_pid, grace_s=0.0)


HEAD_SCRIPT_PRELUDE = """
import json
from cluster.embedded_head import OWNER_FILE, embedded_head
from cluster.head_session import session_processes

def head_titles(head):
    \"\"\"The command lines (process titles) of every process in the head's session.\"\"\"
    session = json.loads((head.temp_dir / OWNER_FILE).read_text())["head"]
    return [open(f"/proc/{pid}/cmdline", "rb").read() for pid in session_processes(session)]
"""


def run_head_script(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `script` (after HEAD_SCRIPT_PRELUDE) in a fresh interpreter, as a run's driver would;
    its stdout, once it has exited 0."""
    result = subprocess.run([sys.executable, "-c", HEAD_SCRIPT_PRELUDE + script, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


IDLE_WORKERS_AFTER_TASKS = """
import time
import ray

with embedded_head(2, 100) as head:
    ray.init(address=head.gcs_address)
    @ray.remote(num_cpus=0.5)
    def hold(seconds):
        time.sleep(seconds)
    ray.get([hold.remote(2.0) for _ in range(4)])  # 4 worker processes on a 2-CPU head
    time.sleep(4.0)  # idle 4 s: past Ray's default 1 s before it kills the workers beyond 2
    print("idle workers", sum(title.startswith(b"ray::IDLE") for title in head_titles(head)), flush=True)
    ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("user_setting, kept", [(None, True), ("1000", False)])
def test_the_head_keeps_idle_workers_unless_the_user_says_otherwise(user_setting, kept):
    """An embedded head keeps the workers of finished tasks (their exits ran beside the ranks and
    slowed an epoch); with Ray's own 1 s set in the user's environment, it kills those beyond one
    per CPU, so the setting is what keeps them."""
    env = dict(os.environ)
    env.pop("RAY_idle_worker_killing_time_threshold_ms", None)
    if user_setting is not None:
        env["RAY_idle_worker_killing_time_threshold_ms"] = user_setting
    out = run_head_script(IDLE_WORKERS_AFTER_TASKS, env=env)
    found = re.search(r"idle workers (\d+)", out)
    assert found, out
    # Kept: the 4 task workers at least (Ray may have started one more). Killed: one per CPU is left.
    assert int(found[1]) >= 4 if kept else int(found[1]) <= 2, found[0]


DASHBOARD_PARTS = """
import sys
import ray
import ray.experimental.internal_kv as kv
from ray.util.state import list_actors
from ray.util.state.exception import ServerUnavailable

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

with embedded_head(2, 100, dashboard=sys.argv[1] == "on") as head:
    ray.init(address=head.gcs_address)
    actor = Idle.remote()
    ray.get(actor.ping.remote())
    print("dashboard modules", sum(title.startswith(b"ray-dashboard-") for title in head_titles(head)), flush=True)
    print("recorded", kv._internal_kv_get("dashboard", namespace="dashboard").decode(), "url", head.dashboard_url, flush=True)
    try:
        # Addressed to this head: without an address Ray picks whichever cluster it finds on the
        # machine (or refuses when it finds several), dashboard or not.
        print("actors listed", len(list_actors(address=head.gcs_address, timeout=20)), flush=True)
    except ServerUnavailable as error:
        print("state query failed:", str(error).split(". ")[0], flush=True)
    ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("dashboard", ["off", "on"])
def test_the_dashboard_modules_run_only_when_asked_for(dashboard):
    """By default the embedded head starts no dashboard module (their processes took CPU from the
    ranks), and a state query addressed to it fails at its own dashboard address with Ray's
    "ServerUnavailable"; with the dashboard asked for, the modules run and the state API answers."""
    out = run_head_script(DASHBOARD_PARTS, dashboard)
    modules = re.search(r"dashboard modules (\d+)", out)
    recorded = re.search(r"recorded (\S+) url (\S+)", out)
    assert modules and recorded, out
    if dashboard == "off":
        assert int(modules[1]) == 0 and recorded[2] == "None", out
        assert f"state query failed: Failed to make request to http://{recorded[1]}/api/v0/actors" in out, out
    else:
        assert int(modules[1]) >= 5, out  # Ray 2.60 runs 9 (state, jobs, reports, ...)
        assert recorded[2] == f"http://{recorded[1]}", out
        assert "actors listed" in out and int(re.search(r"actors listed (\d+)", out)[1]) >= 1, out
