"""The `shardrec` argument tree: every command, its options and their help. The command bodies are
in launcher/cli.py; options of `train` and `config` shared with `python -m trainers` are in
core/run_args.py."""

from __future__ import annotations

import argparse

from core.run_args import ArgumentParser, add_train_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="shardrec", description="Distributed recommendation training on sharded embedding tables.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    data = commands.add_parser("data", help="prepare interaction datasets").add_subparsers(
        dest="data_command", required=True, parser_class=ArgumentParser
    )
    prepare = data.add_parser("prepare", help="prepare a built-in dataset (ml-100k)")
    prepare.add_argument("name", choices=["ml-100k"])
    imported = data.add_parser("import", help="prepare any CSV/TSV/Parquet interaction file")
    imported.add_argument("file")
    imported.add_argument("--user-col", required=True)
    imported.add_argument("--item-col", required=True)
    imported.add_argument("--rating-col")
    imported.add_argument("--timestamp-col")
    imported.add_argument("--extend-ids", metavar="DATASET",
                          help="keep the ids of this earlier prepared dataset and append new ones after them "
                               "(the next day's data for `shardrec train --warm-start`)")
    imported.add_argument("--ids", choices=["contiguous", "raw", "hash"], default="contiguous",
                          help="contiguous: one global map of raw integer ids to 0..n-1 (default); raw: integer "
                               "ids kept as they are, users sharded by a hash of their id, no global user map; "
                               "hash: like raw, for text ids, each hashed to a 64-bit id (collisions reported)")
    for sub in (prepare, imported):
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--split", choices=["random", "loo"], default="random",
                         help="random: per-user 8:1:1 (default); loo: leave-one-out by time")
        sub.add_argument("--seed", type=int, default=2026)
        sub.add_argument("--min-rating", type=float, default=None,
                         help="keep interactions with rating >= this as positives (default: all)")
        sub.add_argument("--shards", type=int, default=0,
                         help="Parquet files per split (default: one per ~2M interactions, a multiple of 4)")
    sample = data.add_parser("sample", help="keep the first N users of a prepared dataset (quick experiments)")
    sample.add_argument("source")
    sample.add_argument("--users", type=int, required=True)
    sample.add_argument("--out", required=True)
    synth = data.add_parser("synth", help="generate a synthetic prepared dataset of any size (power-law popularity)")
    synth.add_argument("--users", type=whole_count, required=True)
    synth.add_argument("--items", type=whole_count, required=True)
    synth.add_argument("--interactions", type=whole_count, required=True, help="target count (the exact one goes in stats.json)")
    synth.add_argument("--out", required=True, help="output folder (new or empty)")
    synth.add_argument("--shards", type=int, default=0, help="Parquet files per split (default: one per 2M interactions, a multiple of 4)")
    synth.add_argument("--split", choices=["random", "loo"], default="random")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--item-exponent", type=float, default=1.1, help="Zipf exponent of item popularity")
    synth.add_argument("--user-exponent", type=float, default=2.0, help="Pareto shape of user activity (> 1)")
    synth.add_argument("--min-per-user", type=int, default=3)
    synth.add_argument("--features", action="store_true", help="also write random side features (two-tower)")
    synth.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    synth.add_argument("--ids", choices=["contiguous", "raw"], default="contiguous",
                       help="raw: scattered 64-bit raw ids (what managed-collision tables key rows by)")
    sequences = data.add_parser(
        "sequences", help="build per-user ordered histories of a leave-one-out dataset with Ray Data"
    )
    sequences.add_argument("source", help="prepared dataset folder (split loo)")
    sequences.add_argument("--address", default="", help="Ray address to use (default: an embedded local cluster)")
    sequences.add_argument("--check", action="store_true",
                           help="also build them in memory and verify both give the same table")

    train = commands.add_parser(
        "train",
        help="train a model through Ray (embedded local cluster unless --cluster.address)",
        epilog="Any config value can be overridden with --section.key value, e.g. --trainer.epochs 5.",
    )
    add_train_arguments(train)
    tune = commands.add_parser(
        "tune",
        help="hyperparameter search by validation with Ray Tune: each trial a sharded `train` run",
        epilog="Config overrides (--section.key value) apply to every trial. Trials never rank the test "
               "split; train the chosen TUNE_DIR/best.toml for its test metrics.",
    )
    tune.add_argument("--config", help="TOML config whose hyperparameters are searched")
    tune.add_argument("--space", required=True,
                      help="TOML search space: config keys with { choice = [...] }, { uniform = [low, high] } "
                           "or { loguniform = [low, high] }")
    tune.add_argument("--trials", type=int, default=16, help="trials to sample (default 16)")
    tune.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                      help="asha: stop trials that trail on the metric early (default); fifo: run every trial to the end")
    tune.add_argument("--metric", default="valid.ndcg@10", help="validation metric to maximise (default valid.ndcg@10)")
    tune.add_argument("--concurrent", type=int, default=0,
                      help="trials at once (default: as many as the cluster's CPUs hold)")
    tune.add_argument("--grace-epochs", type=int, default=2, help="ASHA: epochs every trial runs before it can be stopped")
    tune.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep about 1 in this many at each rung")
    tune.add_argument("--seed", type=int, default=0, help="seed of the trials' sampling")
    tune.add_argument("--include-base", action="store_true",
                      help="the first trial trains the config's own values (one of --trials), so the search "
                           "is measured against them")
    tune.add_argument("--out", help="search folder (default RUN_ROOT/tune-<model>-<time>); must be new or empty")
    plan = commands.add_parser(
        "plan",
        help="sharding-plan experiment: plan, memory per rank and cost on a described cluster, offline",
        epilog="Sharding constraints from the config can be overridden: --sharding.tables.user row_wise.",
    )
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="model config; table sizes from its dataset or --users/--items")
    source.add_argument("--tables", help="table-spec file (TOML [[table]] or CSV: name,rows,dim,pooling,optimizer)")
    plan.add_argument("--topology", action="append", required=True,
                      help="preset name (e.g. 8x8xH100) or TOML file; repeat to compare clusters")
    plan.add_argument("--users", type=whole_count, help="user rows, e.g. 2_000_000_000 (overrides the dataset's)")
    plan.add_argument("--items", type=whole_count, help="item rows (overrides the dataset's)")
    plan.add_argument("--strategy", default="planner",
                      help="planner (default) or force one sharding type on every table")
    plan.add_argument("--compare", choices=["strategies"], help="plan every strategy side by side")
    plan.add_argument("--reserve", type=float, default=None,
                      help="fraction of rank memory kept from tables (default: the config's sharding.reserve, else 0.15)")
    plan.add_argument("--batch-size", type=int, default=None,
                      help="per-rank batch size the estimates assume (default: the config's trainer.batch_size, else 512)")
    plan.add_argument("--out", help="folder for plan.json (usable by --sharding.plan), report.json and report.png")
    baseline = commands.add_parser("baseline", help="score a training-free baseline with the model evaluator")
    baseline.add_argument("name", choices=["popularity"])
    baseline.add_argument("--data", required=True, help="prepared dataset folder")
    baseline.add_argument("--protocol", choices=["full", "sampled", "both"], default="full")
    baseline.add_argument("--k", type=int, default=10)
    baseline.add_argument("--sampled-negatives", type=int, default=99)
    baseline.add_argument("--history", choices=["masked", "kept"], default="masked",
                          help="full ranking: remove the user's earlier items from the ranking (masked) or not "
                               "(kept, the sequence models' protocol)")
    export = commands.add_parser("export", help="write a trained retrieval model's user and item vectors")
    export.add_argument("run_dir")
    export.add_argument("--out", help="output folder (default RUN_DIR/export, or RUN_DIR/export-delta with --since)")
    export.add_argument("--since", metavar="BASE",
                        help="write only the rows new or changed against BASE (an export, a run folder such as "
                             "the parent run, or a checkpoint folder), with tombstones for ids BASE had")
    applied = commands.add_parser("export-apply", help="apply a delta export to the export it was taken against")
    applied.add_argument("base", help="the full export the delta was taken against")
    applied.add_argument("delta", help="a folder written by `shardrec export RUN --since BASE`")
    applied.add_argument("--out", required=True, help="output folder for the full export")
    search = commands.add_parser("search", help="exact top-K items for a user from an export")
    search.add_argument("export_dir")
    target = search.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="raw user id, as in the input data (text ids too, for --ids hash)")
    target.add_argument("--measure-recall", action="store_true",
                        help="approximate vs exact top-K over every exported user: recall@K and query time")
    search.add_argument("--approx", action="store_true", help="use the approximate (faiss HNSW) index")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--include-seen", action="store_true",
                        help="also return items the user interacted with in training/validation")
    cluster = commands.add_parser(
        "cluster", help="a Ray head on this machine for `ray job submit` (token auth on, ready for jobs)"
    ).add_subparsers(dest="cluster_command", required=True, parser_class=ArgumentParser)
    for name, text in (("start", "ray start --head on 127.0.0.1 and wait until it accepts jobs"),
                       ("wait", "wait until the head at --dashboard-port accepts jobs"),
                       ("stop", "stop the head shardrec started on --dashboard-port (its processes only)")):
        sub = cluster.add_parser(name, help=text)
        sub.add_argument("--dashboard-port", type=int, default=8265, help="job-submission port (default 8265)")
        if name == "start":
            sub.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
            sub.add_argument("--num-cpus", type=int, default=None)
            sub.add_argument("--object-store-mb", type=int, default=512)
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the head")
    commands.add_parser("models", help="list registered models and their parameters")
    show = commands.add_parser("config", help="print the resolved config (defaults < file < overrides) as JSON")
    add_train_arguments(show)
    return parser


def whole_count(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value
