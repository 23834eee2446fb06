"""The `shardrec` command line. `main(argv) -> exit code`; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from launcher.config import RunConfig, config_from_json, load_config, parse_override_value
from launcher.errors import UserError
from models.params import is_sequence_model


def report_user_error(exc: UserError) -> int:
    print(f"shardrec: error: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage already; keep its messages but without the traceback noise."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UserError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardrec", description="Distributed recommendation training on sharded embedding tables.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="prepare interaction datasets").add_subparsers(
        dest="data_command", required=True, parser_class=_Parser
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
        sub.add_argument("--shards", type=int, default=4, help="Parquet files per split")
    sample = data.add_parser("sample", help="keep the first N users of a prepared dataset (quick experiments)")
    sample.add_argument("source")
    sample.add_argument("--users", type=int, required=True)
    sample.add_argument("--out", required=True)
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
    _add_train_arguments(train)
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
    plan.add_argument("--reserve", type=float, default=0.15, help="fraction of rank memory kept from tables")
    plan.add_argument("--batch-size", type=int, default=512, help="per-rank batch size the estimates assume")
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
    commands.add_parser("models", help="list registered models and their parameters")
    show = commands.add_parser("config", help="print the resolved config (defaults < file < overrides) as JSON")
    _add_train_arguments(show)
    return parser


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config, e.g. launcher/configs/ncf_ml100k.toml")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _split_overrides(extra: list[str]) -> list[tuple[str, str]]:
    overrides = []
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--") or "." not in token:
            raise UserError(f"unrecognised argument {token!r}; config overrides look like --section.key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if index + 1 >= len(extra):
                raise UserError(f"override {token} needs a value")
            index += 1
            value = extra[index]
        overrides.append((key, value))
        index += 1
    return overrides


def parse_train_args(argv: list[str]) -> tuple[RunConfig, Path | None]:
    """Parse `--config`, `--resume` and dotted overrides (shared by `shardrec train` and torchrun)."""
    parser = _Parser(prog="shardrec train")
    _add_train_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return _resolve_config(args, _split_overrides(extra))


def _resolve_config(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> tuple[RunConfig, Path | None]:
    if args.resume:
        resume_dir = Path(args.resume)
        saved = resume_dir / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {resume_dir}: not a run folder (no config.json)")
        config = config_from_json(saved.read_text())
        for key, value in overrides:
            config.set(key, parse_override_value(value))
        return config.validate(), resume_dir
    if not args.config:
        raise UserError("--config is required (or --resume RUN_DIR)")
    return load_config(args.config, overrides), None


def resolve_run_dir(config: RunConfig, resume_dir: Path | None) -> Path:
    if resume_dir is not None:
        return resume_dir.resolve()
    name = config.trainer.run_name or f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(config.trainer.run_root) / name).resolve()
    if (run_dir / "checkpoints").exists():
        raise UserError(f"run folder {run_dir} already has checkpoints: use --resume {run_dir} or another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _cmd_data(args: argparse.Namespace) -> int:
    from cluster.prepare import PrepareOptions, prepare, prepare_ml100k, read_interactions, sample_dataset

    if args.data_command == "sequences":
        return _cmd_sequences(args)
    if args.data_command == "sample":
        stats = sample_dataset(args.source, args.out, args.users)
    else:
        options = PrepareOptions(split=args.split, seed=args.seed, min_rating=args.min_rating, shards=args.shards)
        if args.data_command == "prepare":
            stats = prepare_ml100k(args.out, options)
        else:
            raw = read_interactions(args.file, args.user_col, args.item_col, args.rating_col, args.timestamp_col)
            stats = prepare(raw, args.out, options, source=str(Path(args.file).resolve()))
    print(
        f"prepared {args.out}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions "
        f"(density {stats['density']:.4f}); splits {stats['splits']}"
    )
    return 0


def _cmd_sequences(args: argparse.Namespace) -> int:
    from cluster.dataset_format import PreparedDataset
    from cluster.ray_cluster import ray_cluster
    from cluster.sequences import build_reference, build_with_ray, load_sequences
    from launcher.config import ClusterSection

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
        same = all(np.array_equal(getattr(table, f), getattr(reference, f)) for f in ("indptr", "train", "valid", "test"))
        print("check against the in-memory reference: " + ("identical" if same else "DIFFERENT"))
        return 0 if same else 1
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from cluster.dataset_format import PreparedDataset

    config, resume_dir = _resolve_config(args, overrides)
    dataset = PreparedDataset.open(config.data.path)  # fail fast, before any cluster starts
    if is_sequence_model(config.model.resolved_params()):
        from cluster.sequences import require_leave_one_out

        require_leave_one_out(dataset)

    from cluster.launch import TrainingFailed, train_on_ray  # heavy imports only once the input is sound
    from trainers.loop import format_summary

    # Workers do not share the driver's working directory: hand them absolute paths.
    config.data.path = str(Path(config.data.path).resolve())
    if config.sharding.plan:
        config.sharding.plan = str(Path(config.sharding.plan).resolve())
    run_dir = resolve_run_dir(config, resume_dir)
    print(f"[shardrec] run folder {run_dir}", flush=True)
    try:
        summary = train_on_ray(config, run_dir, resume=resume_dir is not None)
    except TrainingFailed as exc:
        print(f"shardrec: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(format_summary(summary), flush=True)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from cluster.baselines import popularity
    from cluster.dataset_format import PreparedDataset
    from launcher.config import EvalSection

    section = EvalSection(protocol=args.protocol, k=args.k, sampled_negatives=args.sampled_negatives,
                          history=args.history)
    section.validate()
    for split, result in popularity(PreparedDataset.open(args.data), section).items():
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in result.items() if "@" in name)
        print(f"popularity, {split} ({result['protocol']}; {result['cases']} cases): {metrics}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from cluster.dataset_format import PreparedDataset
    from cluster.retrieval import ExactIndex

    index = ExactIndex(args.export_dir)
    users = np.arange(len(index.users)) if args.measure_recall else np.array([index.user_index(args.user)])
    exclude = None
    if not args.include_seen:
        from trainers.evaluate import UserItems

        dataset = PreparedDataset.open(json.loads((Path(args.export_dir) / "export.json").read_text())["dataset"])
        seen = [dataset.read_split(s) for s in ("train", "valid")]
        by_user = UserItems.build(np.concatenate([s["user_id"] for s in seen]),
                                  np.concatenate([s["item_id"] for s in seen]), dataset.num_users)
        exclude = [by_user.of(user) for user in users]
    if args.measure_recall:
        from cluster.retrieval import ApproximateIndex, recall_at_k

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
        from cluster.retrieval import ApproximateIndex

        top = ApproximateIndex(index.items).search(index.users[users], args.k, exclude)[0]
    else:
        top = index.search(index.users[users], args.k, exclude)[0]
    print(f"top {args.k} items for user {args.user} (raw item ids, best first): "
          f"{' '.join(str(index.item_raw[i]) for i in top)}")
    return 0


def _cmd_models() -> int:
    import dataclasses

    from models.params import MODEL_PARAMS

    for name, params in sorted(MODEL_PARAMS.items()):
        defaults = {f.name: getattr(params(), f.name) for f in dataclasses.fields(params)}
        print(f"{name}: {params.__doc__.strip().splitlines()[0] if params.__doc__ else ''}")
        print(f"  parameters: {json.dumps(defaults)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command == "plan":
            from launcher.plan_command import run_plan_command

            return run_plan_command(args, _split_overrides(extra))
        if args.command in ("train", "config"):
            overrides = _split_overrides(extra)
            if args.command == "config":
                config, _ = _resolve_config(args, overrides)
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
            from trainers.export import export_run

            info = export_run(Path(args.run_dir), Path(args.out) if args.out else None)
            print(f"exported {info['users']} users and {info['items']} items ({info['dim']}-dim {info['model']} "
                  f"vectors from {info['checkpoint']}) to {info['out']}")
            return 0
        if args.command == "search":
            return _cmd_search(args)
        return _cmd_models()
    except UserError as exc:
        return report_user_error(exc)


def entry() -> None:
    sys.exit(main())
