"""The `shardrec` command line. `main(argv) -> exit code`; user errors print one line and exit 2.

Imports of the torch / TorchRec / Ray floors (cluster, trainers, sharding, models) are deferred into
the commands that need them: they take seconds, and bad input must be refused before that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from core.config import ClusterSection, EvalSection, RunConfig
from core.dataset_format import PreparedDataset
from core.errors import TrainingFailed, UserError
from core.interactions import read_user_items
from core.model_params import MODEL_PARAMS, is_sequence_model
from core.run_folder import LOCK_FILE, check_resume, latest_checkpoint, run_folder_lock
from core.export_delta import apply_delta
from core.lineage import check_warm_start
from core.ml100k import prepare_ml100k
from core.prepare import PrepareOptions, prepare_stream, sample_dataset
from core.raw_input import InputColumns, file_batches
from core.synth import SynthOptions, synthesize
from core.sequences import build_reference, load_sequences, require_leave_one_out
from trainers.retrieval import ApproximateIndex, ExactIndex, recall_at_k
from launcher.parser import build_parser
from core.run_args import (
    report_user_error,
    resolve_config,
    resolve_run_dir,
    split_overrides,
)


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "sequences":
        return _cmd_sequences(args)
    if args.data_command == "sample":
        stats = sample_dataset(args.source, args.out, args.users)
    elif args.data_command == "synth":
        stats = _cmd_synth(args)
    else:
        options = PrepareOptions(split=args.split, seed=args.seed, min_rating=args.min_rating, shards=args.shards,
                                 extend_ids=getattr(args, "extend_ids", None), ids=getattr(args, "ids", "contiguous"))
        if args.data_command == "prepare":
            stats = prepare_ml100k(args.out, options)
        else:
            columns = InputColumns(args.user_col, args.item_col, args.rating_col, args.timestamp_col,
                                   hashed=args.ids == "hash")
            stats = prepare_stream(file_batches(args.file, columns), args.out, options,
                                   source=str(Path(args.file).resolve()),
                                   progress=lambda message: print(f"import: {message}", flush=True))
    print(
        f"prepared {args.out}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions "
        f"(density {stats['density']:.4f}); splits {stats['splits']}"
    )
    for kind, count in (stats.get("collisions") or {}).items():
        if count:
            print(f"warning: {count} distinct {kind} id string(s) share a 64-bit hash with another; "
                  "each such group is trained as one id", file=sys.stderr)
    if stats.get("tied_last_timestamps"):
        print(f"warning: {stats['tied_last_timestamps']} of {stats['users']} users' last two interactions share a "
              "timestamp: their test item was chosen by input order (file order breaks ties)", file=sys.stderr)
    return 0


def _cmd_synth(args: argparse.Namespace) -> dict:
    options = SynthOptions(users=args.users, items=args.items, interactions=args.interactions, shards=args.shards,
                           split=args.split, seed=args.seed, item_exponent=args.item_exponent,
                           user_exponent=args.user_exponent, min_per_user=args.min_per_user, features=args.features,
                           ids=args.ids)
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
        check_resume(config, resume_dir, world_size=config.cluster.num_workers)
    elif config.trainer.warm_start:
        check_warm_start(config, world_size=config.cluster.num_workers)
    from cluster.ray_cluster import check_embedded_fits  # Ray only: torch, TorchRec and Ray Train come later

    if not config.cluster.address:
        check_embedded_fits(config.cluster)
    # Workers do not share the driver's working directory: hand them absolute paths.
    config.data.path = str(Path(config.data.path).resolve())
    if config.sharding.plan:
        config.sharding.plan = str(Path(config.sharding.plan).resolve())
    named = Path(config.trainer.run_root) / config.trainer.run_name if config.trainer.run_name else None
    new_folder = resume_dir is None and not (named is not None and named.exists())
    run_dir = resolve_run_dir(config, resume_dir)
    try:
        with run_folder_lock(run_dir):
            return _train_in(config, dataset, run_dir, resume_dir, args.verbose)
    finally:
        if new_folder and {entry.name for entry in run_dir.iterdir()} <= {LOCK_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)  # a refused job leaves no empty run folder behind
            run_dir.rmdir()


def _train_in(config: RunConfig, dataset: PreparedDataset, run_dir: Path, resume_dir: Path | None,
              verbose: bool) -> int:
    """The body of `shardrec train`, holding the run folder."""
    from cluster.ray_cluster import ray_cluster
    from trainers.run_log import process_started_at

    def preflight() -> None:
        from trainers.preflight import check_job  # heavy (torch, TorchRec): only once the light checks pass

        # An embedded cluster (no --cluster.address) runs every rank on this machine.
        here = config.cluster.num_workers if not config.cluster.address else None
        check_job(config, dataset, config.cluster.num_workers, ranks_on_this_machine=here)

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
            with ray_cluster(config.cluster, log=verbose, while_starting=while_head_starts) as where:
                from cluster.launch import train_in_cluster

                summary = train_in_cluster(config, run_dir, resume_dir is not None, where, verbose=verbose)
    except TrainingFailed as exc:
        print(f"shardrec: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except SystemExit:
        # Ray's blocking calls turn the handler's SystemExit into SystemExit(1): what arrived says why.
        if _stopped_by:
            signum = _stopped_by[0]
            print(_interrupted_line(run_dir, signal.Signals(signum).name), file=sys.stderr, flush=True)
            raise SystemExit(128 + signum) from None
        raise
    from trainers.report import format_summary

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
    if index.user_held is not None and not index.user_held[users[0]]:
        note += (" (this user has no row of its own in the model's managed table: never admitted or evicted, "
                 "it is scored through the row such users share)")
    print(f"top {args.k} items for user {args.user} (raw item ids, best first){note}: "
          f"{' '.join(str(index.item_names[i]) for i in found)}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from cluster.head_env import token_path
    from cluster.job_head import start_job_head, stop_job_head, wait_for_jobs  # heavy (Ray)

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


def _interrupted_line(run_dir: Path, signal_name: str) -> str:
    """What a user stopping a run needs to know: where it can go on from."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return f"shardrec: stopped by {signal_name} before the first checkpoint; {run_dir} cannot be resumed"
    return (f"shardrec: stopped by {signal_name}; resume from {latest.name} with: "
            f"shardrec train --resume {run_dir}")


_stopped_by: list[int] = []
"""The signal (SIGINT or SIGTERM) that is ending the command, once one has arrived."""


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM end the command through SystemExit(128 + signal), so its clean-ups run (an
    embedded Ray cluster is stopped, not orphaned); Python's default would end the process on the
    spot, or raise KeyboardInterrupt wherever it lands."""
    _stopped_by.append(signum)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
        signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command == "plan":
            from launcher.plan_command import run_plan_command  # heavy (TorchRec planner)

            return run_plan_command(args, split_overrides(extra))
        if args.command == "tune":
            from launcher.tune_command import run_tune_command

            return run_tune_command(args, split_overrides(extra))
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

            info = export_run(Path(args.run_dir), Path(args.out) if args.out else None,
                              since=Path(args.since) if args.since else None)
            if "delta" not in info:
                print(f"exported {info['users']} users and {info['items']} items ({info['dim']}-dim {info['model']} "
                      f"vectors from {info['checkpoint']}) to {info['out']}")
                return 0
            delta = info["delta"]
            parts = "; ".join(f"{name}: {delta[name]['changed']:,} of {delta[name]['rows']:,} rows new or changed, "
                              f"{delta[name]['removed']:,} removed" for name in ("users", "items"))
            print(f"delta export against {delta['since']} to {info['out']} ({info['model']} vectors from "
                  f"{info['checkpoint']}): {parts}")
            return 0
        if args.command == "export-apply":
            sizes = apply_delta(Path(args.base), Path(args.delta), Path(args.out))
            print(f"applied {args.delta} to {args.base}: {sizes['users']:,} users and {sizes['items']:,} items in {args.out}")
            return 0
        if args.command == "search":
            return _cmd_search(args)
        if args.command == "cluster":
            return _cmd_cluster(args)
        return _cmd_models()
    except UserError as exc:
        return report_user_error(exc)
    except OSError as exc:  # a path given that cannot be read or written (a full disk, a read-only place)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"shardrec: error: {exc.strerror or exc}{where}", file=sys.stderr, flush=True)
        return 2
    except SystemExit:
        if _stopped_by and args.command != "train":  # `train` has said where it can be resumed from
            print(f"shardrec: stopped by {signal.Signals(_stopped_by[0]).name}", file=sys.stderr, flush=True)
        raise


def entry() -> None:
    sys.exit(main())
