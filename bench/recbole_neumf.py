"""RecBole's NeuMF with its default hyperparameters on a shardrec dataset's own splits: the reference
that NCF's preset is compared with, measured the same way.

    .venv/bin/python -m bench.recbole_neumf --data runs/data/ml-100k [--seed 0] [--epochs 300]

The prepared dataset's train, valid and test splits are written as RecBole atomic files
(`benchmark_filename`), so both libraries see the same interactions in each split. Protocol as
shardrec's: full ranking over every item, the user's train items masked for validation and train
and valid items masked for test, test NDCG@10 at the epoch best on validation NDCG@10 (RecBole's
early stopping: 10 evaluations without improvement). RecBole is not part of shardrec's stack: its
pins (ray<=2.6.3, NumPy 1) conflict with it, so install it and the few modules it imports beside the
environment rather than into it:

    .venv/bin/pip install --no-deps --target /tmp/recbole recbole==1.2.1 colorlog==4.7.2 texttable thop \
        scikit-learn scipy narwhals threadpoolctl joblib tabulate
    PYTHONPATH=/tmp/recbole .venv/bin/python -m bench.recbole_neumf --data runs/data/ml-100k
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads


def write_atomic(data: Path, folder: Path, name: str) -> None:
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        table = pads.dataset(data / split).to_table(columns=["user_id", "item_id"])
        lines = ["user_id:token\titem_id:token"]
        lines += [f"{u}\t{i}" for u, i in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist())]
        (folder / f"{name}.{split}.inter").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="runs/data/ml-100k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    import numpy as np

    # RecBole reloads the best checkpoint it wrote itself with a plain torch.load, which torch now
    # limits to weights; the file is this process's own, in its own temporary folder.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    # RecBole 1.2.1 still names aliases NumPy 2 removed; give them back before it is imported.
    for name, alias in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_),
                        ("float", float), ("int", int), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, alias)
    from recbole.quick_start import run_recbole  # optional: only this benchmark needs it

    with tempfile.TemporaryDirectory(prefix="shardrec-recbole-") as folder:
        write_atomic(Path(args.data), Path(folder) / "bench", "bench")
        started = time.time()
        result = run_recbole(model="NeuMF", dataset="bench", config_dict={
            "data_path": folder, "benchmark_filename": ["train", "valid", "test"],
            "load_col": {"inter": ["user_id", "item_id"]}, "seed": args.seed, "reproducibility": True,
            "epochs": args.epochs, "eval_args": {"mode": "full", "order": "RO", "group_by": "user"},
            "metrics": ["Recall", "NDCG", "Hit", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
            "device": "cpu", "use_gpu": False, "show_progress": False, "checkpoint_dir": folder,
        })
        wall = time.time() - started
    valid, test = result["best_valid_result"], result["test_result"]
    print(f"recbole NeuMF on {args.data}: valid NDCG@10 {valid['ndcg@10']:.4f}, test NDCG@10 {test['ndcg@10']:.4f}, "
          f"test Recall@10 {test['recall@10']:.4f}; {wall:.0f} s")


if __name__ == "__main__":
    main()
