"""Rank-0 metric logging: JSONL per step and epoch, TensorBoard scalars, and a progress bar when
attached to a terminal (plain log lines otherwise, e.g. under Ray)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._tensorboard: Any = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (run_dir / "metrics.jsonl").open("a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.info("tensorboard is not installed: TensorBoard scalars are off (metrics.jsonl has them all)")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(f"[shardrec {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def start_epoch(self, epoch: int, total_steps: int | None) -> None:
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=f"epoch {epoch}", unit="step", leave=False)

    def advance(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}")

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
