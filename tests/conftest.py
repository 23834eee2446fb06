"""Shared fixtures: a prepared ML-100K (real data from the installed package) and small samples of it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from core.ml100k import prepare_ml100k
from core.prepare import PrepareOptions, sample_dataset

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
