"""Launch the per-rank trainer on a Ray cluster with Ray Train, and the body of each worker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig

from cluster.data_warmup import boot_shard_task_worker, start_ray_data_helpers
from cluster.process_group import RankGroupConfig
from upstream.ray_private import RankTrainer
from cluster.rank_stream import RayRankStream
from cluster.ray_cluster import ray_train_cpus
from cluster.sequences import build_with_ray
from cluster.shard_sampling import SHARD_TASK_CPUS
from core.config import ClusterSection, RunConfig, config_from_json
from core.dataset_format import PreparedDataset
from core.errors import TrainingFailed, UserError
from core.model_params import is_sequence_model
from core.sequences import sequence_files
from core.run_folder import latest_checkpoint
from core.rank_plan import RankPlan
from trainers.batches import BatchSource, rank_source
from trainers.distributed import setup, teardown
from trainers.run_log import (
    CONSOLE_EVENTS,
    FAILURE_MARK,
    LOG_DIR,
    Console,
    follow_console,
    quiet_rank_output,
    rank_log_path,
    tail,
)
from trainers.trainer import Trainer


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker. Ray Train has already joined the process group (with rank 0's
    store on its node address: cluster/process_group.py); the worker streams its own shards, and
    after a restart (FailureConfig) resumes from the last checkpoint at the next unseen batch.
    Rank 0's console events go to a file the driver renders (`follow_console`)."""
    config = config_from_json(loop_config["config_json"])
    run_dir = Path(loop_config["run_dir"])
    interactions = not is_sequence_model(config.model.resolved_params())
    booting = boot_shard_task_worker() if interactions else None  # up while the model is built
    context = setup(config.cluster.backend, bind_cpus=config.cluster.bind_cpus)
    try:
        with quiet_rank_output(run_dir, context.rank, loop_config["verbose"]):
            dataset = PreparedDataset.open(config.data.path)
            # Interaction models: this worker's own Ray Data pipeline over its own shards.

            def source_for(plan: RankPlan, last_epoch: int | None = None) -> BatchSource:
                # Without last_epoch, one pipeline per epoch: another world's rank replayed for the
                # rest of an epoch it began (trainers/continued_epoch.py) reads that epoch only.
                return rank_source(config, dataset, plan, lambda sampler: RayRankStream(
                    dataset, sampler, config.trainer.batch_size, config.data.shuffle_buffer, plan,
                    last_epoch=last_epoch))

            plan = RankPlan(context.rank, context.world_size, dataset.num_shards, config.trainer.seed)
            source = source_for(plan, config.trainer.epochs)
            resume = loop_config["resume"] or latest_checkpoint(run_dir) is not None
            console = Console(events_file=run_dir / LOG_DIR / CONSOLE_EVENTS) if context.is_main else None
            Trainer(config, context, dataset).fit(source, run_dir, resume=resume, console=console,
                                                  source_for=source_for)
    finally:
        del booting  # its reference is held for the whole run; nothing waits on the task
        teardown(context)


def train_in_cluster(config: RunConfig, run_dir: Path, resume: bool, where: str, say: Any = print,
                     verbose: bool = False) -> dict[str, Any]:
    """Run training on `config.cluster.num_workers` Ray Train workers of the cluster this process is
    connected to (`cluster.ray_cluster.ray_cluster`, described by `where`); returns the run summary.

    With cluster.min_workers, a failed job restarts (up to cluster.max_failures times) on as many
    workers as the cluster holds then, between min_workers and num_workers, from the last
    checkpoint: a lost node shrinks the job instead of ending it, and nodes that came back are used
    at the next restart."""
    dataset = PreparedDataset.open(config.data.path)
    section = config.cluster
    say(f"{where}; {section.num_workers} Ray Train workers ({section.backend})")
    interactions = not is_sequence_model(config.model.resolved_params())
    if not interactions:
        if not sequence_files(dataset):
            say("building per-user sequences with Ray Data (once per dataset)")
            build_with_ray(dataset, say)
    else:  # interaction models stream through Ray Data
        check_task_cpus(section, ray.cluster_resources().get("CPU", 0.0))
        start_ray_data_helpers(say)
    workers, restarts = section.num_workers, 0
    while True:
        try:
            return _fit_once(config, run_dir, resume, workers, restarts, verbose)
        except TrainingFailed as failure:
            if not section.min_workers or restarts >= section.max_failures:
                raise
            restarts += 1
            time.sleep(LOST_NODE_SETTLE_S)  # a node lost with the job is taken off the cluster's resources
            workers = workers_that_fit(section, interactions)
            if workers < section.min_workers:
                raise TrainingFailed(f"{failure}\nthe cluster now holds {workers} worker(s), fewer than cluster.min_workers "
                                     f"({section.min_workers}): not restarting") from failure
            say(f"training failed: {str(failure).splitlines()[0]}")
            say(f"restart {restarts} of {section.max_failures}: on {workers} worker(s), as many as the cluster holds "
                f"now (cluster.min_workers {section.min_workers}, num_workers {section.num_workers}), from the last "
                "checkpoint")
            resume = True


LOST_NODE_SETTLE_S = 3.0
"""Pause after a failed elastic attempt before counting the cluster's resources again."""


def workers_that_fit(section: ClusterSection, interactions: bool) -> int:
    """Workers the cluster's live nodes hold now (their CPUs, and GPUs when used; one per node with
    STRICT_SPREAD), at most num_workers."""
    resources = ray.cluster_resources()
    per_worker = section.cpus_per_worker + (SHARD_TASK_CPUS if interactions else 0.0)
    fit = int((resources.get("CPU", 0.0) + 1e-9) // per_worker) if per_worker > 0 else section.num_workers
    if section.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0.0)))
    if section.placement == "STRICT_SPREAD":
        fit = min(fit, sum(1 for node in ray.nodes() if node.get("Alive")))
    return min(fit, section.num_workers)


def _fit_once(config: RunConfig, run_dir: Path, resume: bool, workers: int, attempt: int, verbose: bool
              ) -> dict[str, Any]:
    """One Ray Train job of `workers` workers (attempt 0, or an elastic restart)."""
    section = config.cluster
    elastic = section.min_workers > 0
    trainer = RankTrainer(
        ray_train_loop,
        embedded=not section.address,  # ray_cluster's own head, stopped when this driver ends
        train_loop_config={"config_json": config.to_json(), "run_dir": str(run_dir), "resume": resume,
                           "verbose": verbose},
        # rank 0's store on its node address only; no torch import in Ray Train's controller
        torch_config=RankGroupConfig(backend=section.backend),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=section.use_gpu,
            resources_per_worker={"CPU": section.cpus_per_worker},
            placement_strategy=section.placement,
        ),
        run_config=RayRunConfig(
            name="ray-train" if not attempt else f"ray-train-restart-{attempt}",
            storage_path=str(run_dir.resolve()),
            # A restart that cannot place its workers within cluster.placement_timeout_s (set in
            # the workers' environment, see ray_cluster.rank_env) ends the job: Ray's default
            # retries that wait without limit, a hang when a node is gone for good. An elastic job
            # is restarted here instead, on the workers the cluster holds then.
            failure_config=FailureConfig(max_failures=0 if elastic else section.max_failures,
                                         controller_failure_limit=0),
        ),
    )
    try:
        with follow_console(run_dir):
            trainer.fit()
    except Exception as exc:  # Ray wraps the rank's exception; surface it as one failure.
        headline = _failing_rank_line(run_dir, workers)
        raise TrainingFailed(f"training failed: {headline or _ray_error_head(exc)}\n{_ray_error_head(exc)}"
                             f"{_rank_tails(run_dir, workers)}") from exc
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise TrainingFailed(f"training ended without writing {summary_file}")
    return json.loads(summary_file.read_text())


def check_task_cpus(section: ClusterSection, cluster_cpus: float) -> None:
    """Refuse a cluster without the CPU for one shard task per rank beside the ranks' own. Each
    rank's Ray Data pipeline runs one shard task at a time (RayRankStream.pipeline), and a paused
    task keeps its CPU: with fewer, some rank's task could never start, and the job would hang."""
    needed = ray_train_cpus(section)
    if cluster_cpus + 1e-9 < needed:
        raise UserError(
            f"the Ray cluster has {cluster_cpus:g} CPUs; {section.num_workers} workers need {needed:g}: "
            f"cluster.cpus_per_worker ({section.cpus_per_worker:g}) each, and {SHARD_TASK_CPUS:g} each for "
            "their Ray Data shard tasks. Add CPUs (or nodes), lower cluster.cpus_per_worker, or use "
            "fewer workers")


def _ray_error_head(exc: Exception, max_lines: int = 12) -> str:
    """Ray's error, trimmed: its first lines name the failing worker and the exception."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return "\n".join(lines[:max_lines]) + (f"\n  ... ({len(lines) - max_lines} more lines)" if len(lines) > max_lines else "")


def _failing_rank_line(run_dir: Path, world_size: int) -> str:
    """The failing rank's own one-line error, as its log's last lines record it ("" if none did)."""
    for rank in range(world_size):
        for line in reversed(tail(rank_log_path(run_dir, rank)).splitlines()):
            if FAILURE_MARK in line:
                return line.split(FAILURE_MARK, 1)[1]
    return ""


def _rank_tails(run_dir: Path, world_size: int) -> str:
    """The last lines of each rank log that ends in a traceback: the failing rank's own words."""
    parts = []
    for rank in range(world_size):
        path = rank_log_path(run_dir, rank)
        text = tail(path)
        if "Traceback" in text or "Error" in text:
            parts.append(f"\nrank {rank} ({path}):\n{text.rstrip()}")
    return "".join(parts)
