"""Throughput of the training data path alone (no model): rows/s delivered to 2 ranks' batch loops.

Baseline, measured in the same run: the torchrun path (each rank reads its Parquet files with
pyarrow and samples negatives in numpy). Compared: the Ray Data path (each rank's own pipeline for
all the epochs, one task per (epoch, shard) reading the shard and drawing its negatives, blocks in
order, cut into batches through a seeded shuffle buffer: cluster/rank_stream.py), consumed by two
threads standing in for the two Ray Train workers.

    .venv/bin/shardrec data prepare ml-100k --out runs/data/ml-100k
    .venv/bin/python -m bench.data_path [--data runs/data/ml-100k] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from core.config import ClusterSection, DataSection
from trainers.batches import ParquetFilesSource

BATCH = 1024


def pyarrow_rows_per_s(dataset: PreparedDataset, data: DataSection, epochs: int) -> float:
    sampler = NegativeSampler(dataset.num_items, data.negatives, data.reject_positives)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        rows = 0
        for rank in range(2):  # sequentially: the ranks would run in parallel, so this is conservative
            source = ParquetFilesSource(dataset, sampler, BATCH, rank, 2, seed=0)
            rows += sum(len(b["label"]) for b in source.epoch(epoch))
        rates.append(rows / (time.perf_counter() - started))
    return statistics.median(rates)


def ray_data_rows_per_s(dataset: PreparedDataset, data: DataSection, epochs: int) -> float:
    from cluster.rank_stream import RayRankStream
    from cluster.ray_cluster import ray_cluster

    sampler = NegativeSampler(dataset.num_items, data.negatives, data.reject_positives)
    with ray_cluster(ClusterSection(), log=False):
        # one pipeline for all the epochs, as a training run has (last_epoch)
        streams = [RayRankStream(dataset, sampler, BATCH, data.shuffle_buffer, rank, 2, seed=0, last_epoch=epochs - 1)
                   for rank in range(2)]
        rates = []
        for epoch in range(epochs):
            counts = [0, 0]
            failures: list[BaseException] = []

            def consume(index: int) -> None:
                try:
                    for batch in streams[index].epoch(epoch):
                        counts[index] += len(batch["label"])
                except BaseException as error:  # re-raised below: a failed stream fails the benchmark
                    failures.append(error)

            started = time.perf_counter()
            threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failures:
                raise failures[0]
            rates.append(sum(counts) / (time.perf_counter() - started))
        for stream in streams:
            stream.close()
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="runs/data/ml-100k")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    dataset = PreparedDataset.open(args.data)
    data = DataSection(path=args.data)
    baseline = pyarrow_rows_per_s(dataset, data, args.epochs)
    print(f"baseline  pyarrow files + numpy negatives (torchrun path): {baseline:,.0f} rows/s (median of {args.epochs} epochs)")
    ray_rate = ray_data_rows_per_s(dataset, data, args.epochs)
    print(f"Ray Data, a pipeline per rank (shard tasks -> negatives -> iter_batches): {ray_rate:,.0f} rows/s = "
          f"{ray_rate / baseline:.2f}x baseline")
    print(f"ray_vs_pyarrow {ray_rate / baseline:.3f}")


if __name__ == "__main__":
    main()
