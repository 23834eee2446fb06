"""Exact top-K retrieval over exported item vectors (numpy, no torch.distributed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from launcher.errors import UserError


class ExactIndex:
    """Brute-force inner-product search: the reference an approximate index is measured against."""

    def __init__(self, export_dir: str | Path) -> None:
        export_dir = Path(export_dir)
        if not (export_dir / "items.parquet").is_file():
            raise UserError(f"{export_dir} is not an export folder (run `shardrec export RUN_DIR` first)")
        self.items = _vectors(export_dir / "items.parquet")
        self.users = _vectors(export_dir / "users.parquet")
        self.user_raw = pq.read_table(export_dir / "users.parquet", columns=["raw_id"]).column(0).to_numpy()
        self.item_raw = pq.read_table(export_dir / "items.parquet", columns=["raw_id"]).column(0).to_numpy()

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> np.ndarray:
        """Top-k item ids [Q, k] by inner product, best first; `exclude[q]` items are never returned."""
        scores = queries.astype(np.float32) @ self.items.T
        if exclude is not None:
            for row, items in enumerate(exclude):
                scores[row, items] = -np.inf
        top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        return np.take_along_axis(top, order, 1)

    def user_index(self, raw_id: int) -> int:
        found = np.flatnonzero(self.user_raw == raw_id)
        if not len(found):
            raise UserError(f"user {raw_id} is not in the export")
        return int(found[0])


def _vectors(path: Path) -> np.ndarray:
    column = pq.read_table(path, columns=["vector"]).column(0).combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.float32)
