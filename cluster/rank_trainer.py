"""Ray Train's TorchTrainer without the helper actors a shardrec run has no use for.

Ray Train starts each helper of its default callbacks as an actor, a new Python process that
imports Ray (1.3-1.6 s of CPU each). On 2 cores they came up while the ranks imported torch and
TorchRec, and a run's start-up is CPU-bound there (`shardrec train`, ML-100K: 37 s of CPU in the
first 24 s of wall time), so each one delayed the first step. Two of them do nothing here:
- the dataset manager (DatasetsCallback) serves the shards of datasets handed to the trainer; shardrec
  hands none (each rank runs its own Ray Data pipeline, `cluster.rank_stream`, with its own
  DataContext settings), yet Ray Train starts the actor all the same;
- the placement-group cleaner (PlacementGroupCleanerCallback), a detached actor that removes the
  run's placement group should the controller die, matters on a long-lived cluster, but an embedded
  cluster is stopped, placement groups and all, when its driver ends.
Measured (4 interleaved runs each, first step of `shardrec train` from the command's start, with
the autoscaler monitor left out as well, `cluster.local_head`): median 20.1 s -> 17.6 s.

The callbacks are picked out by class name through `_create_default_callbacks`, Ray Train's own
(private) list: a Ray that renames either keeps it, which only costs the time again.
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer

UNUSED_WITHOUT_DATASETS = "DatasetsCallback"
UNUSED_ON_EMBEDDED_CLUSTER = "PlacementGroupCleanerCallback"


class RankTrainer(TorchTrainer):
    """A TorchTrainer for shardrec's ranks: no `datasets`; `embedded` says the cluster ends with the
    driver (see the module docstring)."""

    def __init__(self, *args: Any, embedded: bool, **kwargs: Any) -> None:
        if kwargs.get("datasets"):
            raise ValueError("shardrec's ranks read their own shards; RankTrainer takes no datasets")
        self.unused_callbacks = {UNUSED_WITHOUT_DATASETS} | ({UNUSED_ON_EMBEDDED_CLUSTER} if embedded else set())
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list[Any]:
        return [callback for callback in super()._create_default_callbacks()
                if type(callback).__name__ not in self.unused_callbacks]
