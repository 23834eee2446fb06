"""Shared fixtures: a prepared ML-100K (real data from the installed package) and small samples of it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.ml100k import ml100k_source, prepare_ml100k
from core.prepare import PrepareOptions, prepare_stream, sample_dataset
from core.raw_input import InputColumns, file_batches

REPO = Path(__file__).resolve().parents[1]

TIERS = ("unit", "distributed", "ray", "slow", "multihost", "gpu")
"""Each test carries exactly one (pyproject.toml describes them); `make test-fast` runs the first two."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        tiers = sorted({marker.name for marker in item.iter_markers()} & set(TIERS))
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'none'}")
    if wrong:
        raise pytest.UsageError("each test needs exactly one tier marker of " + ", ".join(TIERS) + ":\n" + "\n".join(wrong))


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_one_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test that starts a process (a subprocess, a fork, a Ray cluster) fails here: it belongs
    to another tier. Session fixtures are set up before this runs, so they may."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a unit test runs in one process: mark a test that starts processes "
                             "distributed, ray or slow")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(os, "fork", refuse)


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ml-100k"
    prepare_ml100k(out, PrepareOptions(shards=4))
    return out


@pytest.fixture(scope="session")
def ml100k_small(ml100k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 users of ML-100K with all their interactions: seconds per epoch."""
    out = tmp_path_factory.mktemp("data") / "ml-100k-60u"
    sample_dataset(ml100k, out, users=60)
    return out


@pytest.fixture(autouse=True)
def _loopback_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's token authentication stays on, as for a user: no test turns it off.
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)


@pytest.fixture(scope="session")
def ml100k_loo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K split leave-one-out by time, for the sequence models."""
    out = tmp_path_factory.mktemp("data") / "ml-100k-loo"
    prepare_ml100k(out, PrepareOptions(split="loo", shards=4))
    return out


@pytest.fixture(scope="session")
def ml100k_loo_small(ml100k_loo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ml-100k-loo-60u"
    sample_dataset(ml100k_loo, out, users=60)
    return out


@pytest.fixture(scope="session")
def ml100k_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ML-100K as two days of a growing log (leave-one-out by time): day 1 is the interactions
    before the 60th percentile of time, day 2 those before the 80th, imported with day 1's id maps
    extended (new users and items after day 1's)."""
    root = tmp_path_factory.mktemp("days")
    rows = np.loadtxt(ml100k_source(), skiprows=1, dtype=np.int64, usecols=(0, 1, 2, 3))
    days = []
    for day, percentile in ((1, 60), (2, 80)):
        cut = np.percentile(rows[:, 3], percentile)
        kept = rows[rows[:, 3] < cut]
        log = root / f"day{day}.parquet"
        pq.write_table(pa.table({"user": kept[:, 0], "item": kept[:, 1], "ts": kept[:, 3]}), log)
        out = root / f"day{day}"
        options = PrepareOptions(split="loo", shards=4, extend_ids=days[-1] if days else None)
        prepare_stream(file_batches(log, InputColumns("user", "item", None, "ts")), out, options, source=str(log))
        days.append(out)
    return days[0], days[1]
