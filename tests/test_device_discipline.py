"""Device discipline, enforced on CPU so that the GPU path does not regress unseen.

While a rank builds each model family, takes a training step and evaluates, a TorchFunctionMode
watches every tensor factory call (torch.zeros, arange, tensor, as_tensor, ...) made directly by
shardrec's model, batch, trainer and evaluation code, and fails the test if one gives no `device=`:
on a GPU such a tensor lands on the CPU, and NCCL rejects it or the step slows down. Every tensor
handed to a collective must sit on the process group's device.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from core.config import config_from_json, load_config
from core.dataset_format import PreparedDataset
from core.model_params import batch_kind_of
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from tests.conftest import REPO
from tests.forked_ranks import run_ranks
from trainers.batches import ParquetFilesSource, SequenceWindowsSource
from trainers.distributed import collective_device, setup
from trainers.trainer import Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

FACTORIES = {torch.zeros, torch.ones, torch.arange, torch.tensor, torch.as_tensor, torch.empty, torch.full,
             torch.randint, torch.rand, torch.randn, torch.eye}
WATCHED = [REPO / "models", REPO / "trainers" / "evaluate.py", REPO / "trainers" / "batches.py",
           REPO / "trainers" / "trainer.py", REPO / "trainers" / "distributed.py", REPO / "trainers" / "sharded_model.py"]
TORCH_DIR = str(Path(torch.__file__).parent) + "/"
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_to_all_single", "reduce_scatter_tensor")


class DeviceDiscipline(TorchFunctionMode):
    """Records factory calls without a device made by watched files, and collectives given tensors
    off the process group's device."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = next((frame for frame in reversed(traceback.extract_stack()[:-1])
                           if not frame.filename.startswith(TORCH_DIR) and not frame.filename.endswith(__file__.split("/")[-1])), None)
            if caller is not None and any(caller.filename.startswith(str(w)) for w in WATCHED):
                self.violations.append(f"{caller.filename}:{caller.lineno} {func.__name__}() without device=")
        return func(*args, **kwargs)


def _watch_collectives(violations: list[str]) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def checked(*args, _original=original, _name=name, **kwargs):  # noqa: ANN001, ANN202
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            for tensor in tensors:
                if tensor.device != collective_device():
                    violations.append(f"dist.{_name} given a tensor on {tensor.device}")
            return _original(*args, **kwargs)

        setattr(dist, name, checked)


def _step_and_evaluate(rank: int, world: int, config_json: str) -> list[str]:
    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    mode = DeviceDiscipline()
    _watch_collectives(mode.violations)
    with mode:
        context = setup()
        trainer = Trainer(config, context, dataset)
        params = config.model.resolved_params()
        if batch_kind_of(params) == "sequence":
            source = SequenceWindowsSource(dataset, params, 16, RankPlan(rank, world, dataset.num_shards))
        else:
            sampler = NegativeSampler(dataset.num_items, config.data.negatives, True, batch_kind=batch_kind_of(params))
            source = ParquetFilesSource(dataset, sampler, 64, RankPlan(rank, world, dataset.num_shards))
        trainer.train_step(next(iter(source.epoch(1))))
        trainer.evaluate("valid")
    return mode.violations


@pytest.mark.parametrize("name, extra", [
    ("ncf", []),
    ("lightgcn", []),
    ("lightgcn", [("model.propagation", "sampled"), ("model.fanout", "5")]),
    ("two_tower", []),
    ("sasrec", [("eval.protocol", "both")]),
])
def test_models_and_evaluation_create_tensors_on_the_rank_device(ml100k_small, ml100k_loo_small, name, extra):
    data = ml100k_loo_small if name == "sasrec" else ml100k_small
    config = load_config(str(REPO / f"launcher/configs/{name}_ml100k.toml"),
                         [("data.path", str(data)), *extra]).to_json()
    violations = run_ranks(_step_and_evaluate, 2, config)
    assert violations == [[], []], "\n".join(sorted(set(violations[0] + violations[1])))


def _leaky(rank: int, world: int) -> list[str]:
    mode = DeviceDiscipline()
    with mode:
        from models.features import padded_kjt  # watched code...

        padded_kjt(["a"], {"a": torch.arange(3, device="cpu")})
        exec(compile("torch.zeros(2)", str(REPO / "models" / "leak.py"), "exec"), {"torch": torch})  # ...and a leak
    return mode.violations


def test_the_checker_can_fail():
    (violations,) = run_ranks(_leaky, 1)
    assert len(violations) == 1 and "leak.py" in violations[0]
