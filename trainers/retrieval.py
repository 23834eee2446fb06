"""Exact top-K retrieval over exported item vectors (numpy, no torch.distributed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError
from core.id_hash import hash_strings


class ExactIndex:
    """Brute-force inner-product search: the reference an approximate index is measured against."""

    def __init__(self, export_dir: str | Path) -> None:
        export_dir = Path(export_dir)
        if not (export_dir / "items.parquet").is_file():
            raise UserError(f"{export_dir} is not an export folder (run `shardrec export RUN_DIR` first)")
        try:
            self.items = _vectors(export_dir / "items.parquet")
            self.users = _vectors(export_dir / "users.parquet")
            self.user_raw = pq.read_table(export_dir / "users.parquet", columns=["raw_id"]).column(0).to_numpy()
            items = pq.ParquetFile(export_dir / "items.parquet")
            self.item_raw = items.read(columns=["raw_id"]).column(0).to_numpy()
            self.item_names = (items.read(columns=["raw_text"]).column(0).to_numpy(zero_copy_only=False)
                               if "raw_text" in items.schema_arrow.names else self.item_raw)
            """How the input data wrote each item id: its text (--ids hash), else its raw id."""
            users = pq.ParquetFile(export_dir / "users.parquet")
            self.user_held = (users.read(columns=["held"]).column(0).to_numpy()
                              if "held" in users.schema_arrow.names else None)
            """Managed-collision tables ([ids]): whether each user had a row of its own."""
            self.id_mode = json.loads((export_dir / "export.json").read_text()).get("ids", "contiguous")
        except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
            raise UserError(f"{export_dir}: incomplete or corrupt export ({exc}); run `shardrec export` again") from None

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> np.ndarray:
        """Top-k item ids [Q, k] by inner product, best first; `exclude[q]` items are never returned.
        Where fewer than k items are left to return, the row ends in -1."""
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        scores = queries.astype(np.float32) @ self.items.T
        if exclude is not None:
            for row, items in enumerate(exclude):
                scores[row, items] = -np.inf
        width = min(k, scores.shape[1])
        top = np.argpartition(-scores, kth=width - 1, axis=1)[:, :width]
        chosen = np.take_along_axis(scores, top, 1)
        order = np.argsort(-chosen, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        top[np.take_along_axis(chosen, order, 1) == -np.inf] = -1  # excluded items fill no slot
        out = np.full((len(queries), k), -1, dtype=np.int64)
        out[:, :width] = top
        return out

    def user_index(self, raw_id: int | str) -> int:
        """The export's row of a user given by its raw id as the input data wrote it: an integer, or
        (an export of a dataset imported with --ids hash) its text, hashed as the import hashed it."""
        key = self.raw_key(raw_id)
        found = np.flatnonzero(self.user_raw == key)
        if not len(found):
            raise UserError(f"user {raw_id} is not in the export")
        return int(found[0])

    def raw_key(self, raw_id: int | str) -> int:
        if self.id_mode == "hash":
            return int(hash_strings(pa.array([str(raw_id)]))[0][0])
        try:
            return int(raw_id)
        except ValueError:
            raise UserError(f"user {raw_id!r}: this export's raw ids are integers") from None


def _vectors(path: Path) -> np.ndarray:
    column = pq.read_table(path, columns=["vector"]).column(0).combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.float32)


class ApproximateIndex:
    """faiss HNSW graph over the item vectors (inner product): sub-linear search, approximate results.

    Seen items are removed after the search, so it over-fetches `k + len(exclude)` candidates.
    """

    def __init__(self, items: np.ndarray, neighbours: int = 32, ef_search: int = 64) -> None:
        try:
            import faiss
        except ImportError:
            raise UserError("the approximate index needs faiss: pip install faiss-cpu") from None
        self.index = faiss.IndexHNSWFlat(items.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = ef_search
        self.index.add(np.ascontiguousarray(items, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> np.ndarray:
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, self.index.ntotal)
        self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, fetch)
        _, found = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        for row, candidates in enumerate(found):
            if exclude is not None:
                candidates = candidates[~np.isin(candidates, exclude[row])]
            candidates = candidates[candidates >= 0]
            _, first = np.unique(candidates, return_index=True)  # faiss repeats ids when asked past its graph
            candidates = candidates[np.sort(first)][:k]
            out[row, : len(candidates)] = candidates
        return out


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-K ∩ exact top-K| / |exact top-K| (-1 marks an empty slot)."""
    shares = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approximate, exact)]
    return float(np.mean(shares))
