"""The `shardrec` command line. `main(argv) -> exit code`; user errors print one line and exit 2.

Imports of the torch / TorchRec / Ray floors (cluster, trainers, sharding, models) are deferred into
the commands that need them: they take seconds, and bad input must be refused before that.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from core.config import ClusterSection, EvalSection
from core.dataset_format import PreparedDataset
from core.errors import TrainingFailed, UserError
from core.interactions import read_user_items
from core.model_params import MODEL_PARAMS, is_sequence_model
from core.run_folder import check_resume
from core.prepare import PrepareOptions, prepare_ml100k, prepare_stream, sample_dataset
from core.raw_input import InputColumns, file_batches
from core.synth import SynthOptions, synthesize
from core.sequences import build_reference, load_sequences, require_leave_one_out
from trainers.retrieval import ApproximateIndex, ExactIndex, recall_at_k
from core.run_args import (
    ArgumentParser,
    add_train_arguments,
    report_user_error,
    resolve_config,
    resolve_run_dir,
    split_overrides,
)


def _build_parser() -> argparse.ArgumentParser:
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
    synth.add_argument("--users", type=_count, required=True)
    synth.add_argument("--items", type=_count, required=True)
    synth.add_argument("--interactions", type=_count, required=True, help="target count (the exact one goes in stats.json)")
    synth.add_argument("--out", required=True, help="output folder (new or empty)")
    synth.add_argument("--shards", type=int, default=0, help="Parquet files per split (default: one per 2M interactions, a multiple of 4)")
    synth.add_argument("--split", choices=["random", "loo"], default="random")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--item-exponent", type=float, default=1.1, help="Zipf exponent of item popularity")
    synth.add_argument("--user-exponent", type=float, default=2.0, help="Pareto shape of user activity (> 1)")
    synth.add_argument("--min-per-user", type=int, default=3)
    synth.add_argument("--features", action="store_true", help="also write random side features (two-tower)")
    synth.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
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
    plan.add_argument("--users", type=_count, help="user rows, e.g. 2_000_000_000 (overrides the dataset's)")
    plan.add_argument("--items", type=_count, help="item rows (overrides the dataset's)")
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
    export.add_argument("--out", help="output folder (default RUN_DIR/export)")
    search = commands.add_parser("search", help="exact top-K items for a user from an export")
    search.add_argument("export_dir")
    target = search.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", type=int, help="raw user id, as in the input data")
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


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "sequences":
        return _cmd_sequences(args)
    if args.data_command == "sample":
        stats = sample_dataset(args.source, args.out, args.users)
    elif args.data_command == "synth":
        stats = _cmd_synth(args)
    else:
        options = PrepareOptions(split=args.split, seed=args.seed, min_rating=args.min_rating, shards=args.shards)
        if args.data_command == "prepare":
            stats = prepare_ml100k(args.out, options)
        else:
            columns = InputColumns(args.user_col, args.item_col, args.rating_col, args.timestamp_col)
            stats = prepare_stream(file_batches(args.file, columns), args.out, options,
                                   source=str(Path(args.file).resolve()),
                                   progress=lambda message: print(f"import: {message}", flush=True))
    print(
        f"prepared {args.out}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions "
        f"(density {stats['density']:.4f}); splits {stats['splits']}"
    )
    if stats.get("tied_last_timestamps"):
        print(f"warning: {stats['tied_last_timestamps']} of {stats['users']} users' last two interactions share a "
              "timestamp: their test item was chosen by input order (file order breaks ties)", file=sys.stderr)
    return 0


def _cmd_synth(args: argparse.Namespace) -> dict:
    options = SynthOptions(users=args.users, items=args.items, interactions=args.interactions, shards=args.shards,
                           split=args.split, seed=args.seed, item_exponent=args.item_exponent,
                           user_exponent=args.user_exponent, min_per_user=args.min_per_user, features=args.features)
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        print(f"\rsynth: {done}/{total} shards, {elapsed:.0f} s", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    stats = synthesize(options, args.out, workers=args.workers, progress=progress)
    print(f"synth: {stats['interactions']} interactions in {stats['shards']} shards, {time.monotonic() - started:.1f} s")
    return stats


def _cmd_sequences(args: argparse.Namespace) -> int:
    from cluster.ray_cluster import ray_cluster  # heavy (Ray)
    from cluster.sequences import build_with_ray

    dataset = PreparedDataset.open(args.source)
    with ray_cluster(ClusterSection(address=args.address), log=False) as where:
        print(f"[shardrec] {where}", flush=True)
        build_with_ray(dataset)
    table = load_sequences(dataset)
    lengths = table.indptr[1:] - table.indptr[:-1]
    print(f"{table.num_users} users; train history length min {lengths.min()}, median {int(np.median(lengths))}, "
          f"max {lengths.max()}; {int((table.valid >= 0).sum())} valid and {int((table.test >= 0).sum())} test items")
    if args.check:
        reference = build_reference(dataset)
        same = all(np.array_equal(getattr(table, f), getattr(reference, f))
                   for f in ("users", "indptr", "train", "valid", "test"))
        print("check against the in-memory reference: " + ("identical" if same else "DIFFERENT"))
        return 0 if same else 1
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    config, resume_dir = resolve_config(args, overrides)
    dataset = PreparedDataset.open(config.data.path)  # fail fast, before any cluster starts
    if is_sequence_model(config.model.resolved_params()):
        require_leave_one_out(dataset)
    if resume_dir is not None:
        check_resume(config, resume_dir)

    def preflight() -> None:
        from trainers.preflight import check_job  # heavy (torch, TorchRec): only once the light checks pass

        try:
            check_job(config, dataset, config.cluster.num_workers)
        except UserError:
            if new_folder:  # a refused job leaves no empty run folder behind
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise

    from cluster.ray_cluster import ray_cluster  # Ray only: torch, TorchRec and Ray Train come while the head starts
    from trainers.run_log import process_started_at

    # Workers do not share the driver's working directory: hand them absolute paths.
    config.data.path = str(Path(config.data.path).resolve())
    if config.sharding.plan:
        config.sharding.plan = str(Path(config.sharding.plan).resolve())
    named = Path(config.trainer.run_root) / config.trainer.run_name if config.trainer.run_name else None
    new_folder = resume_dir is None and not (named is not None and named.exists())
    run_dir = resolve_run_dir(config, resume_dir)
    print(f"[shardrec] run folder {run_dir}", flush=True)
    def while_head_starts() -> None:
        # The checks and the imports of the training stack (about 4 s together) overlap the start of
        # an embedded Ray head (about 4 s); a refused job stops the head.
        preflight()
        import cluster.launch  # noqa: F401 (heavy: torch, TorchRec, Ray Train)

    try:
        if config.cluster.launcher == "torchrun":
            preflight()
            from cluster.torchrun_launch import train_with_torchrun  # heavy (Ray)

            summary = train_with_torchrun(config, run_dir, resume=resume_dir is not None)
        else:
            with ray_cluster(config.cluster, log=args.verbose, while_starting=while_head_starts) as where:
                from cluster.launch import train_in_cluster

                summary = train_in_cluster(config, run_dir, resume_dir is not None, where, verbose=args.verbose)
    except TrainingFailed as exc:
        print(f"shardrec: error: {exc}", file=sys.stderr, flush=True)
        return 1
    from trainers.trainer import format_summary

    print(format_summary(summary, process_started_at()), flush=True)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from trainers.baselines import popularity  # heavy (torch)

    section = EvalSection(protocol=args.protocol, k=args.k, sampled_negatives=args.sampled_negatives,
                          history=args.history)
    section.validate()
    for split, result in popularity(PreparedDataset.open(args.data), section).items():
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in result.items() if "@" in name)
        print(f"popularity, {split} ({result['protocol']}; {result['cases']} cases): {metrics}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")

    index = ExactIndex(args.export_dir)
    users = np.arange(len(index.users)) if args.measure_recall else np.array([index.user_index(args.user)])
    exclude = None
    if not args.include_seen:
        dataset = PreparedDataset.open(json.loads((Path(args.export_dir) / "export.json").read_text())["dataset"])
        by_user = read_user_items(dataset, ("train", "valid"))
        exclude = [by_user.of(user) for user in users]
    if args.measure_recall:
        started = time.perf_counter()
        exact = index.search(index.users[users], args.k, exclude)
        exact_s = time.perf_counter() - started
        approximate = ApproximateIndex(index.items)
        started = time.perf_counter()
        found = approximate.search(index.users[users], args.k, exclude)
        approx_s = time.perf_counter() - started
        print(f"{len(users)} users, {len(index.items)} items: approximate (faiss HNSW) recall@{args.k} against exact "
              f"{recall_at_k(found, exact):.4f}; query time exact {exact_s * 1000:.1f} ms, approximate {approx_s * 1000:.1f} ms")
        return 0
    if args.approx:
        top = ApproximateIndex(index.items).search(index.users[users], args.k, exclude)[0]
    else:
        top = index.search(index.users[users], args.k, exclude)[0]
    found = [int(i) for i in top if i >= 0]
    note = "" if len(found) == args.k else f" (only {len(found)} items are left once the user's own are excluded)"
    print(f"top {args.k} items for user {args.user} (raw item ids, best first){note}: "
          f"{' '.join(str(index.item_raw[i]) for i in found)}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from cluster.local_head import start_job_head, stop_job_head, token_path, wait_for_jobs  # heavy (Ray)

    url = f"http://127.0.0.1:{args.dashboard_port}"
    try:
        if args.cluster_command == "start":
            url = start_job_head(args.dashboard_port, args.port, args.num_cpus, args.object_store_mb, args.timeout)
            print(f"Ray head ready for jobs at {url} (token authentication on; the token is {token_path()})\n"
                  f"client: export RAY_AUTH_MODE=token\n"
                  f"submit: ray job submit --address {url} --working-dir . -- shardrec train ... --cluster.address auto\n"
                  f"stop:   shardrec cluster stop" + ("" if args.dashboard_port == 8265 else f" --dashboard-port {args.dashboard_port}"))
        elif args.cluster_command == "wait":
            wait_for_jobs(url, args.timeout)
            print(f"Ray head at {url} accepts jobs")
        else:
            print(f"stopped the Ray head at {stop_job_head(args.dashboard_port)}")
    except RuntimeError as exc:
        print(f"shardrec: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _cmd_models() -> int:
    for name, params in sorted(MODEL_PARAMS.items()):
        defaults = {f.name: getattr(params(), f.name) for f in dataclasses.fields(params)}
        print(f"{name}: {params.__doc__.strip().splitlines()[0] if params.__doc__ else ''}")
        print(f"  parameters: {json.dumps(defaults)}")
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the command through SystemExit, so its clean-ups run (an embedded Ray cluster
    is stopped, not orphaned); Python's default would end the process on the spot."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command == "plan":
            from launcher.plan_command import run_plan_command  # heavy (TorchRec planner)

            return run_plan_command(args, split_overrides(extra))
        if args.command in ("train", "config"):
            overrides = split_overrides(extra)
            if args.command == "config":
                config, _ = resolve_config(args, overrides)
                print(config.to_json())
                return 0
            return _cmd_train(args, overrides)
        if extra:
            raise UserError(f"unrecognised arguments: {' '.join(extra)}")
        if args.command == "data":
            return _cmd_data(args)
        if args.command == "baseline":
            return _cmd_baseline(args)
        if args.command == "export":
            from trainers.export import export_run  # heavy (torch, TorchRec)

            info = export_run(Path(args.run_dir), Path(args.out) if args.out else None)
            print(f"exported {info['users']} users and {info['items']} items ({info['dim']}-dim {info['model']} "
                  f"vectors from {info['checkpoint']}) to {info['out']}")
            return 0
        if args.command == "search":
            return _cmd_search(args)
        if args.command == "cluster":
            return _cmd_cluster(args)
        return _cmd_models()
    except UserError as exc:
        return report_user_error(exc)


def entry() -> None:
    sys.exit(main())
