"""Baselines computed without training, scored by the same evaluator as the models."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.config import EvalSection
from core.dataset_format import PreparedDataset
from core.interactions import item_counts
from core.rank_plan import RankPlan
from trainers.evaluate import Evaluator


def popularity(dataset: PreparedDataset, eval_config: EvalSection) -> dict[str, dict[str, Any]]:
    """Recommend every user the items with the most training interactions (their own masked)."""
    counts = item_counts(dataset).astype(np.float64)
    # Break ties by item id, deterministically, so the baseline is reproducible to the digit.
    scores = torch.as_tensor(counts - np.arange(dataset.num_items) * 1e-9)
    evaluator = Evaluator(dataset, eval_config, RankPlan(0, 1, dataset.num_shards))
    return {split: evaluator.evaluate_item_scores(scores, split) for split in ("valid", "test")}
