"""How shardrec sets Ray up, checked without starting a cluster: the auth token a head needs, and the
Ray Train helpers a run starts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

import cluster  # noqa: F401  (Ray's environment, as every run sets it, before Ray is imported)
from cluster.head_env import ensure_private_token
from cluster.process_group import RankGroupConfig
from upstream.ray_private import RankTrainer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_head_on_a_machine_without_a_token_gets_a_private_one(tmp_path, monkeypatch):
    token = tmp_path / "home" / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ensure_private_token()
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) and _mode(token) == 0o600
    ensure_private_token()
    assert token.read_text() == first  # kept: a running cluster's clients hold this one
    token.chmod(0o644)  # as Ray writes its own
    ensure_private_token()
    assert token.read_text() == first and _mode(token) == 0o600


def test_a_token_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    from core.errors import UserError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(blocker / "auth_token"))  # its folder is a file
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(UserError, match="cannot make Ray's token file .*RAY_AUTH_TOKEN_PATH"):
        ensure_private_token()


@pytest.mark.parametrize("setting", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "given-by-the-user"}])
def test_no_token_file_when_auth_is_off_or_the_token_is_given(tmp_path, monkeypatch, setting):
    token = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    ensure_private_token()
    assert not token.exists()


def _callbacks(trainer_class: type, tmp_path: Path, **kwargs: object) -> list[str]:
    from ray.train import RunConfig, ScalingConfig

    trainer = trainer_class(lambda config: None, torch_config=RankGroupConfig(backend="gloo"),
                            scaling_config=ScalingConfig(num_workers=2),
                            run_config=RunConfig(name="callbacks", storage_path=str(tmp_path)), **kwargs)
    return [type(callback).__name__ for callback in trainer._create_default_callbacks()]


def test_ray_train_starts_no_dataset_manager_and_no_cleaner_on_an_embedded_cluster(tmp_path):
    from ray.train.torch import TorchTrainer

    ray_train_own = _callbacks(TorchTrainer, tmp_path)
    unused = ["DatasetsCallback", "PlacementGroupCleanerCallback"]
    assert set(unused) <= set(ray_train_own)  # the names are Ray Train's: no silent no-op filter
    assert _callbacks(RankTrainer, tmp_path, embedded=True) == [n for n in ray_train_own if n not in unused]
    # a cluster that outlives the driver keeps the cleaner of a dead controller's placement group
    assert _callbacks(RankTrainer, tmp_path, embedded=False) == [n for n in ray_train_own if n != unused[0]]
    with pytest.raises(ValueError, match="takes no datasets"):
        RankTrainer(lambda config: None, embedded=True, datasets={"train": object()})


def test_a_cluster_without_a_shard_task_cpu_per_rank_is_refused_before_training():
    """Each rank's pipeline runs one shard task at a time, and a paused task keeps its CPU: a cluster
    without that CPU for every rank, beside the ranks' own, would hang a job (see
    test_ray_stream.py), so it is refused with a message that says what to change."""
    from cluster.launch import check_task_cpus
    from cluster.ray_cluster import embedded_cpus
    from core.config import ClusterSection
    from core.errors import UserError

    two = ClusterSection(num_workers=2, cpus_per_worker=0.5)
    check_task_cpus(two, 2.0)  # the 2-core machine's embedded cluster: 1 CPU for the ranks, 1 for their tasks
    with pytest.raises(UserError, match=r"has 1.5 CPUs; 2 workers need 2: .*cpus_per_worker \(0.5\) each, and 0.5"):
        check_task_cpus(two, 1.5)
    four = ClusterSection(num_workers=4, cpus_per_worker=1.0)
    with pytest.raises(UserError, match="4 workers need 6"):
        check_task_cpus(four, 4.0)
    # An embedded cluster is sized to pass the check: the workers' CPUs and a task's for each
    for section in (two, four, ClusterSection(num_workers=3, cpus_per_worker=0.25), ClusterSection(num_workers=1)):
        cpus = embedded_cpus(section)
        check_task_cpus(section, cpus)
        assert cpus >= 2
    assert embedded_cpus(two) == 2 and embedded_cpus(four) == 6
