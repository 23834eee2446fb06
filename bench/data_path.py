"""Throughput of the training data path alone (no model): rows/s delivered to 2 ranks' batch loops.

Baseline, measured in the same run: the torchrun path (each rank reads its Parquet files with
pyarrow and samples negatives in numpy). Compared: the Ray Data path (each rank's own pipeline for
all the epochs, tasks of whole shards reading them and drawing their negatives, blocks in order,
cut into batches through a seeded shuffle buffer: cluster/rank_stream.py), consumed by two threads
standing in for the two Ray Train workers.

Each path's rows/s is the median over its steady epochs (the epochs after the first); the first
epoch is printed apart, as is the ratio of the medians over all epochs (this benchmark's statistic
before steady epochs were separated). Ray Data reads ahead in its own processes, so a steady epoch
of ML-100K size is often delivered from blocks already waiting: the ratio says whether the Ray
path keeps a trainer fed, not how fast one process samples.

    .venv/bin/shardrec data prepare ml-100k --out runs/data/ml-100k
    .venv/bin/python -m bench.data_path [--data runs/data/ml-100k] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from core.dataset_format import PreparedDataset
from core.negatives import NegativeSampler
from core.config import ClusterSection, DataSection
from core.rank_plan import RankPlan
from trainers.batches import ParquetFilesSource

BATCH = 1024


def pyarrow_rows_per_s(dataset: PreparedDataset, data: DataSection, epochs: int) -> list[float]:
    sampler = NegativeSampler(dataset.num_items, data.negatives, data.reject_positives)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        rows = 0
        for rank in range(2):  # sequentially: the ranks would run in parallel, so this is conservative
            source = ParquetFilesSource(dataset, sampler, BATCH, RankPlan(rank, 2, dataset.num_shards))
            rows += sum(len(b["label"]) for b in source.epoch(epoch))
        rates.append(rows / (time.perf_counter() - started))
    return rates


def ray_data_rows_per_s(dataset: PreparedDataset, data: DataSection, epochs: int) -> list[float]:
    from cluster.data_warmup import boot_shard_task_worker, start_ray_data_helpers
    from cluster.rank_stream import RayRankStream
    from cluster.ray_cluster import ray_cluster
    import ray  # after the cluster package, which sets Ray's loopback-only mode before Ray is imported

    sampler = NegativeSampler(dataset.num_items, data.negatives, data.reject_positives)
    with ray_cluster(ClusterSection(), log=False):
        # As `shardrec train` does: the driver starts Ray Data's helpers, and each rank boots a task
        # worker while it builds its model (waited for here, in place of that build).
        start_ray_data_helpers(print)
        ray.get([boot_shard_task_worker() for _ in range(2)])
        # one pipeline for all the epochs, as a training run has (last_epoch)
        streams = [RayRankStream(dataset, sampler, BATCH, data.shuffle_buffer, RankPlan(rank, 2, dataset.num_shards), last_epoch=epochs - 1)
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
    return rates


def steady(rates: list[float]) -> float:
    """Rows/s of a run's steady epochs: the median of the epochs after the first (whose time, for
    Ray Data, includes starting the pipeline; `shardrec train` starts it once for the whole run)."""
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="runs/data/ml-100k")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2: the first epoch is reported apart from the steady ones")
    dataset = PreparedDataset.open(args.data)
    data = DataSection(path=args.data)
    baseline = pyarrow_rows_per_s(dataset, data, args.epochs)
    ray_rates = ray_data_rows_per_s(dataset, data, args.epochs)
    for name, rates in (("pyarrow files + numpy negatives (torchrun path)", baseline),
                        ("Ray Data, a pipeline per rank (shard tasks -> negatives -> blocks)", ray_rates)):
        print(f"{name}: steady {steady(rates):,.0f} rows/s (median of epochs 2-{args.epochs}); "
              f"first epoch {rates[0]:,.0f}; every epoch {', '.join(f'{rate:,.0f}' for rate in rates)}")
    print(f"median of all {args.epochs} epochs: Ray Data / pyarrow "
          f"{statistics.median(ray_rates) / statistics.median(baseline):.3f}")
    print(f"ray_vs_pyarrow {steady(ray_rates) / steady(baseline):.3f}")


if __name__ == "__main__":
    main()
