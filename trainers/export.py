"""`shardrec export RUN_DIR`: user and item vectors of a trained retrieval model, for serving.

Runs as a single process (its own 1-rank gloo group): the run's last checkpoint loads into one rank
whatever world size trained it.

    RUN_DIR/export/items.parquet   item_id, raw_id, vector   (the index to search)
    RUN_DIR/export/users.parquet   user_id, raw_id, vector   (known users, ready to query)
    RUN_DIR/export/export.json     model, dimension, where it came from
    RUN_DIR/export/user_encoder.pt two-tower only: user tower + user tables, to embed users offline
                                   (models.two_tower.encode_users)

`--since BASE` writes only the rows that changed against BASE (core/export_delta.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from core.config import IdsSection, config_from_json
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.export_delta import is_export, write_delta
from models.two_tower import TwoTower, user_encoder
from core.run_folder import resumable_checkpoint
from trainers import checkpoint
from trainers.distributed import free_loopback_port, setup
from trainers.managed_export import fill_plain_table, read_managed_tables
from trainers.sharded_model import ShardedModel, build_sharded_model, dataset_row_keys, full_tables, table_weights

CHUNK = 4096


def all_vectors(sharded: ShardedModel, column: str, count: int) -> np.ndarray:
    """[count, dim] vectors of every user or item, in id order (single rank)."""
    model = sharded.model
    key = model.retrieval_key
    model.eval()
    model.begin_ranking()
    try:
        with torch.no_grad():
            parts = [model.vectors(column, torch.arange(start, min(start + CHUNK, count), device=model.device))[key]
                     for start in range(0, count, CHUNK)]
    finally:
        model.end_ranking()
    return torch.cat(parts).numpy().astype(np.float32)


def export_run(run_dir: Path, out: Path | None = None, since: Path | None = None,
               checkpoint_path: Path | None = None) -> dict[str, Any]:
    """Export the run's newest complete checkpoint (or `checkpoint_path`) to `out` (default
    RUN_DIR/export); with `since`, only what changed against that base (core/export_delta.py) to
    `out` (default RUN_DIR/export-delta)."""
    if since is not None:
        return _export_delta(run_dir, out or run_dir / "export-delta", since)
    # One process on a saved plan-free layout: TorchRec's notices about it are not the user's business,
    # nor DCP's about the ShardedTensors TorchRec's state dicts are made of.
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # TorchRec's managed-collision modules ask
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    try:
        config = config_from_json(config_file.read_text())
    except ValueError as exc:
        raise UserError(f"{config_file}: not a valid run config ({exc})") from None
    latest = checkpoint_path or resumable_checkpoint(run_dir)
    if latest is None:
        raise UserError(f"{run_dir} has no complete checkpoint to export")
    dataset = PreparedDataset.open(config.data.path)
    out = out or run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    owns_group = not dist.is_initialized()
    if owns_group:
        # A group of its own on a fresh loopback port: an inherited MASTER_PORT may belong to a
        # group that still holds it.
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_loopback_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        config.sharding.plan, config.sharding.default, config.sharding.tables = "", "", {}
        # Managed id tables ([ids]) are exported through plain ones, one row per dataset id
        # (trainers/managed_export.py): their remapping state is split by the ranks that wrote it.
        managed = config.ids.managed
        config.ids = IdsSection()
        sharded = build_sharded_model(config, dataset, setup("gloo"))
        if sharded.model.retrieval_key is None:
            raise UserError(f"model {config.model.name!r} does not score by a dot product of user and item "
                            "vectors, so it cannot be exported for retrieval (two_tower, lightgcn and the sequence "
                            "models can)")
        held = _load_weights(sharded, latest, dataset, managed)
        users = all_vectors(sharded, "user_id", dataset.num_users)
        items = all_vectors(sharded, "item_id", dataset.num_items)
        if isinstance(sharded.model, TwoTower):
            torch.save(user_encoder(sharded.model, full_tables(sharded)), out / "user_encoder.pt")
    finally:
        if owns_group:
            dist.destroy_process_group()
    for name, vectors, id_file in (("users", users, "user_ids.parquet"), ("items", items, "item_ids.parquet")):
        column = "user_id" if name == "users" else "item_id"
        id_map = pq.read_table(dataset.root / id_file)
        raw = id_map.column("raw_id")
        texts = {"raw_text": id_map.column("raw_text")} if "raw_text" in id_map.column_names else {}
        columns = {column: np.arange(len(vectors), dtype=np.int64), "raw_id": raw, **texts,
                   "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])}
        if column in held:
            columns["held"] = held[column]
        pq.write_table(pa.table(columns), out / f"{name}.parquet")
    info = {"model": config.model.name, "dim": int(items.shape[1]), "users": len(users), "items": len(items),
            "ids": dataset.id_mode, "checkpoint": str(latest), "dataset": str(dataset.root)}
    if held:
        info["held"] = {column.removesuffix("_id") + "s": int(flags.sum()) for column, flags in held.items()}
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "out": str(out)}


def _load_weights(sharded: ShardedModel, path: Path, dataset: PreparedDataset, managed: bool) -> dict[str, np.ndarray]:
    """Load checkpoint `path`'s weights into the one-rank export model. With `managed` ([ids]), the
    plain tables standing for managed ones get each dataset id's managed row. Returns, per managed
    column, whether each id had a row of its own."""
    state = sharded.dmp.state_dict()
    held: dict[str, np.ndarray] = {}
    logging.disable(logging.WARNING)  # DCP logs each failed metadata read with its traceback
    try:
        tables = read_managed_tables(path) if managed else {}
        if managed and not tables:
            raise UserError(f"{path}: no managed-collision state in this checkpoint (was it trained with [ids]?)")
        standing_in = {name for named in tables.values() for name in named}
        filled = {key for key, table, _ in table_weights(state) if table in standing_in}
        checkpoint.load({"model": {key: value for key, value in state.items() if key not in filled}}, path,
                        restore_rng=False)
        for column, named in tables.items():
            row_keys, ids_at = sharded.model.table_row_keys(column, dataset_row_keys(dataset, column))
            for name, rows in named.items():
                row, flags = rows.rows_of(row_keys)
                held[column] = flags[ids_at]
                fill_plain_table(state, name, rows.weight[torch.from_numpy(row)])
    except UserError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read this checkpoint ({reason})") from None
    finally:
        logging.disable(logging.NOTSET)
    sharded.dmp.load_state_dict(state)
    return held


def _export_delta(run_dir: Path, out: Path, since: Path) -> dict[str, Any]:
    """`since` is an export folder, a run folder (its newest checkpoint) or one of a run's checkpoint
    folders; the full exports it needs are written to a scratch folder beside `out` and removed."""
    scratch = out.parent / f".{out.name}.scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if is_export(since):
            base = since
        elif (since / "progress.json").is_file() and since.parent.name == "checkpoints":
            base = Path(export_run(since.parent.parent, scratch / "base", checkpoint_path=since)["out"])
        elif (since / "config.json").is_file():
            base = Path(export_run(since, scratch / "base")["out"])
        else:
            raise UserError(f"--since {since}: not an export, a run folder or a run's checkpoint folder")
        info = export_run(run_dir, scratch / "now")
        counts = write_delta(scratch / "now", base, out, {key: v for key, v in info.items() if key != "out"},
                             named=str(since))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**info, "out": str(out), "delta": counts}
