"""Precision and optimizer options for GPU runs, checked on CPU where FBGEMM and gloo run them:
fp16 table weights, quantised all-to-all (fp16/bf16), bf16 autocast, the table optimizers."""

from __future__ import annotations

import pytest

from core.config import load_config
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.negatives import NegativeSampler
from core.rank_plan import RankPlan
from tests.conftest import REPO
from tests.forked_ranks import run_ranks
from trainers.batches import ParquetFilesSource

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

STEPS = 12


def _losses(rank: int, world: int, config_json: str) -> tuple[list[float], list[str]]:
    from core.config import config_from_json
    from trainers.distributed import setup
    from trainers.sharded_model import table_weights
    from trainers.trainer import Trainer

    config = config_from_json(config_json)
    dataset = PreparedDataset.open(config.data.path)
    trainer = Trainer(config, setup(), dataset)
    source = ParquetFilesSource(dataset, NegativeSampler(dataset.num_items, 4), 128, RankPlan(rank, world, dataset.num_shards))
    losses = [float(trainer.train_step(batch)[1]) for _, batch in zip(range(STEPS), source.epoch(1))]
    dtypes = sorted({str(shard.tensor.dtype) for _, _, value in table_weights(trainer.sharded.dmp.state_dict())
                     for shard in value.local_shards()})
    return losses, dtypes


def _run(data, *overrides: tuple[str, str]) -> list[tuple[list[float], list[str]]]:
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"),
                         [("data.path", str(data)), ("model.dropout", "0.0"), *overrides])
    return run_ranks(_losses, 2, config.to_json())


@pytest.fixture(scope="module")
def fp32(ml100k_small):
    return _run(ml100k_small)


def test_fp16_tables_hold_half_width_rows_and_train_like_fp32(ml100k_small, fp32):
    half = _run(ml100k_small, ("sharding.table_dtype", "fp16"))
    assert fp32[0][1] == ["torch.float32"] and half[0][1] == ["torch.float16"]
    assert half[0][0] == pytest.approx(fp32[0][0], abs=5e-3)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_quantised_all_to_all_changes_the_bits_not_the_training(ml100k_small, fp32, precision):
    quantised = _run(ml100k_small, ("sharding.comms_forward", precision), ("sharding.comms_backward", precision))
    difference = max(abs(a - b) for a, b in zip(quantised[0][0], fp32[0][0]))
    assert 0 < difference < 2e-2  # the codec ran (the losses moved) and training is the same to 2e-2


def test_bf16_autocast_trains_like_fp32(ml100k_small, fp32):
    bf16 = _run(ml100k_small, ("trainer.mixed_precision", "bf16"))
    assert bf16[0][0] == pytest.approx(fp32[0][0], abs=2e-2)
    assert bf16[0][0] != fp32[0][0]  # autocast did run the dense layers in bfloat16


def test_sgd_on_the_tables_trains(ml100k_small):
    losses = _run(ml100k_small, ("trainer.table_optimizer", "sgd"), ("trainer.sparse_lr", "0.5"))[0][0]
    assert losses[-1] < losses[0]


def test_fused_adam_is_refused_on_cpu_with_the_reason(ml100k_small):
    with pytest.raises(UserError, match="CUDA only"):
        load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"), [("trainer.table_optimizer", "adam")])
    config = load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"),
                         [("trainer.table_optimizer", "adam"), ("cluster.backend", "nccl")])
    assert config.trainer.table_optimizer == "adam"


@pytest.mark.parametrize("key, value", [("sharding.table_dtype", "int8"), ("sharding.comms_forward", "fp8"),
                                        ("trainer.mixed_precision", "fp16"), ("trainer.table_optimizer", "lamb")])
def test_unknown_precisions_are_refused(key, value):
    with pytest.raises(UserError, match=key.split(".")[1]):
        load_config(str(REPO / "launcher/configs/ncf_ml100k.toml"), [(key, value)])
