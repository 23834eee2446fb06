"""Each rank on its own share of the node's CPUs (cluster.bind_cpus): the shares, and the binding of
every thread of a process, the threads it had already started included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.distributed import cpu_share, cpus_by_core

pytestmark = [pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.unit
@pytest.mark.parametrize("count,ranks", [(2, 2), (16, 3), (5, 2), (7, 7), (64, 8)])
def test_shares_are_consecutive_disjoint_cover_every_cpu_and_differ_by_one_at_most(count, ranks):
    cpus = [c * 2 + 1 for c in range(count)]  # any set of CPU numbers, not only 0..n-1
    shares = [cpu_share(cpus, rank, ranks) for rank in range(ranks)]
    assert [c for share in shares for c in share] == cpus  # in order, each once
    assert all(shares) and max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.unit
def test_a_nodes_only_rank_and_more_ranks_than_cpus_are_not_bound():
    assert cpu_share([0, 1, 2, 3], 0, 1) == ()
    assert cpu_share([0, 1], 1, 3) == ()


def _topology(root: Path, layout: dict[int, tuple[int, int]]) -> Path:
    for cpu, (socket, core) in layout.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{socket}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


@pytest.mark.unit
def test_a_cores_threads_go_to_one_rank_and_a_socket_to_as_few_ranks_as_divide(tmp_path):
    # 2 sockets x 2 cores x 2 threads, numbered as Linux does: 0-3 the cores, 4-7 their second threads
    layout = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    topology = _topology(tmp_path, layout)
    ordered = cpus_by_core(list(range(9)), topology)  # CPU 8: no topology folder
    assert ordered == [0, 4, 1, 5, 2, 6, 3, 7, 8]
    four = [cpu_share(ordered[:8], rank, 4) for rank in range(4)]
    assert [{layout[cpu] for cpu in share} for share in four] == [{(0, 0)}, {(0, 1)}, {(1, 0)}, {(1, 1)}]
    two = [cpu_share(ordered[:8], rank, 2) for rank in range(2)]
    assert [{layout[cpu][0] for cpu in share} for share in two] == [{0}, {1}]  # a socket each


@pytest.mark.unit
def test_cpus_without_a_readable_topology_keep_their_number_order(tmp_path):
    assert cpus_by_core([3, 1, 2], tmp_path / "none") == [1, 2, 3]


BIND = """
import json, os, sys, threading
from trainers.distributed import bind_to_own_cpus
started = threading.Event()
before = threading.Thread(target=started.wait)  # a thread running before the binding (as gloo's)
before.start()
share = bind_to_own_cpus(int(sys.argv[1]), int(sys.argv[2]))
seen = {}
after = threading.Thread(target=lambda: seen.update(after=sorted(os.sched_getaffinity(0))))
after.start(); after.join()
seen["before"] = sorted(os.sched_getaffinity(before.native_id))
seen["main"] = sorted(os.sched_getaffinity(0))
started.set(); before.join()
print(json.dumps({"share": list(share), **seen}))
"""


def _bind(local_rank: int, local_world_size: int) -> dict[str, list[int]]:
    # In a process of its own: binding the test process would bind every later test.
    result = subprocess.run([sys.executable, "-c", BIND, str(local_rank), str(local_world_size)], cwd=REPO,
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_binding_covers_the_threads_started_before_and_after_it():
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"this machine lets tests run on {len(allowed)} CPU: nothing to split between 2 ranks")
    for rank in (0, 1):
        seen = _bind(rank, 2)
        assert seen["share"] == list(cpu_share(cpus_by_core(allowed), rank, 2))
        assert seen["main"] == seen["before"] == seen["after"] == seen["share"]
    alone = _bind(0, 1)  # a node's only rank keeps every CPU
    assert alone["share"] == [] and alone["main"] == alone["before"] == alone["after"] == allowed
