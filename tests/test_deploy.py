"""The deployment manifests parse, and every command, file and config key they name exists."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cluster.head_env import NODE_HEALTH_ENV
from launcher.cli import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]
REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "cluster" / "deploy"


def _train_args(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[:2] == ["shardrec", "train"], command
    return words[2:]


def _config_file(args: list[str]) -> Path:
    return REPO / args[args.index("--config") + 1]


def test_ray_up_config_installs_the_pinned_stack_and_keeps_token_auth():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) > 0 for t in workers)
    setup = " ".join(config["setup_commands"])
    assert "tools/install_stack.sh --cuda" in setup and (REPO / "tools" / "install_stack.sh").is_file()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in command
        if command.startswith("RAY_AUTH_MODE"):
            assert command.startswith("RAY_AUTH_MODE=token ")
    head_start = " ".join(config["head_start_ray_commands"])
    assert all(f"{name}={value}" in head_start for name, value in NODE_HEALTH_ENV.items())  # lost nodes found fast
    # the job command in its header comment is a valid shardrec command on a known config
    header = (DEPLOY / "ray-cluster.yaml").read_text().split("cluster_name:")[0]
    submitted = " ".join(line.lstrip("# ").rstrip("\\\\ ") for line in header.splitlines() if "shardrec train" in line
                         or line.lstrip("# ").startswith("--"))
    args = _train_args(submitted[submitted.index("shardrec train"):])
    assert _config_file(args).is_file()
    assert main(["config", *args]) == 0


def test_kuberay_job_entrypoint_is_a_valid_train_command(capsys):
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    args = _train_args(job["spec"]["entrypoint"])
    assert _config_file(args).is_file()
    assert main(["config", *args]) == 0  # every override names a known key with a valid value
    resolved = capsys.readouterr().out
    assert '"backend": "nccl"' in resolved and '"use_gpu": true' in resolved
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)
    assert "RAY_AUTH_MODE: token" in job["spec"]["runtimeEnvYAML"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert NODE_HEALTH_ENV.items() <= {e["name"]: e["value"] for e in head["env"]}.items()
