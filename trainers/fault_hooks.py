"""Testing aids that a real run can switch on through its environment (the end-to-end fault tests
run real commands, so the hooks cannot be injected any other way). Both are off unless
SHARDREC_RECORD_BATCHES names a folder.

- Each rank appends, per step, the (user, item) rows of its batch's positives to
  <folder>/rank-<r>.jsonl: what the exactly-once tests compare.
- With SHARDREC_FAIL_AT_STEP=<rank>:<step> that rank kills itself with SIGKILL right after that
  step (a lost host), once: a marker file in the folder stops a restarted job from failing at the
  same step again.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np

RECORD_BATCHES_ENV = "SHARDREC_RECORD_BATCHES"
FAIL_AT_STEP_ENV = "SHARDREC_FAIL_AT_STEP"


class BatchRecorder:
    def __init__(self, path: Path, fail_at: int | None) -> None:
        self.path, self.fail_at = path, fail_at

    @classmethod
    def from_environment(cls, rank: int) -> "BatchRecorder | None":
        folder = os.environ.get(RECORD_BATCHES_ENV)
        if not folder:
            return None
        fail_rank, _, fail_step = os.environ.get(FAIL_AT_STEP_ENV, "").partition(":")
        fail_at = int(fail_step) if fail_step and int(fail_rank) == rank else None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"rank-{rank}.jsonl", fail_at)

    def record(self, step: int, batch: dict[str, np.ndarray]) -> None:
        positive = batch["label"] > 0 if "label" in batch else slice(None)
        rows = {"step": step, "pid": os.getpid(), "users": batch["user_id"][positive].tolist(),
                "items": batch["item_id"][positive].tolist()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(rows) + "\n")
        if self.fail_at is not None and step == self.fail_at:
            marker = self.path.with_name(f"{self.path.stem}-killed-at-{step}")
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
