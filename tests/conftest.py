"""Shared fixtures: a prepared ML-100K (real data from the installed package) and small samples of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.prepare import PrepareOptions, prepare_ml100k, sample_dataset

REPO = Path(__file__).resolve().parents[1]


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
