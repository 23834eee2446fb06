"""Launch the per-rank trainer on a Ray cluster with Ray Train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.dataset_format import PreparedDataset
from cluster.ray_cluster import ray_cluster
from launcher.config import RunConfig
from models.params import is_sequence_model


class TrainingFailed(RuntimeError):
    """A rank failed; Ray Train stopped the whole worker group."""


def train_on_ray(config: RunConfig, run_dir: Path, resume: bool, say: Any = print) -> dict[str, Any]:
    """Run training on `config.cluster.num_workers` Ray Train workers; returns the run summary."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.pipeline import training_dataset
    from cluster.sequences import build_with_ray, sequence_files
    from trainers.entry import ray_train_loop

    dataset = PreparedDataset.open(config.data.path)
    section = config.cluster
    with ray_cluster(section) as where:
        say(f"{where}; {section.num_workers} Ray Train workers ({section.backend})")
        params = config.model.resolved_params()
        if is_sequence_model(params) and not sequence_files(dataset):
            say("building per-user sequences with Ray Data (once per dataset)")
            build_with_ray(dataset, say)
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"config_json": config.to_json(), "run_dir": str(run_dir), "resume": resume},
            torch_config=TorchConfig(backend=section.backend),
            scaling_config=ScalingConfig(
                num_workers=section.num_workers,
                use_gpu=section.use_gpu,
                resources_per_worker={"CPU": section.cpus_per_worker},
            ),
            run_config=RayRunConfig(
                name="ray-train",
                storage_path=str(run_dir.resolve()),
                failure_config=FailureConfig(max_failures=section.max_failures),
            ),
            datasets={"train": training_dataset(dataset, config.data, params)},
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps the rank's exception; surface it as one failure.
            raise TrainingFailed(f"training failed: {exc}") from exc
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise TrainingFailed(f"training ended without writing {summary_file}")
    return json.loads(summary_file.read_text())
