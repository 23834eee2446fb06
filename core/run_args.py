"""Arguments of a training run, shared by `shardrec train` (launcher) and a torchrun rank (trainers):
`--config FILE`, `--resume RUN_DIR`, `--verbose` and `--section.key value` overrides."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.config import RunConfig, config_from_json, load_config, parse_override_value
from core.errors import UserError
from core.lineage import parent_config


def report_user_error(exc: UserError) -> int:
    """Print a user error as one line on stderr; returns its exit code."""
    print(f"shardrec: error: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse's usage messages, but raised as UserError (one line, exit 2) rather than sys.exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UserError(message)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config, e.g. launcher/configs/ncf_ml100k.toml")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--warm-start", metavar="RUN_DIR",
                        help="a new run that starts from the finished run RUN_DIR's tables and optimizer state "
                             "(with --data.path NEXT_DAY: the next day's data, ids extended; without --config: "
                             "RUN_DIR's config)")
    parser.add_argument("--verbose", action="store_true",
                        help="show TorchRec, FBGEMM and Ray logging on the console (default: RUN_DIR/logs/)")


def split_overrides(extra: list[str]) -> list[tuple[str, str]]:
    """`--a.b value` / `--a.b=value` tokens -> [(a.b, value)]."""
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


def parse_train_args(argv: list[str]) -> tuple[RunConfig, Path | None, bool]:
    """(config, resume folder or None, verbose) from a training command line."""
    parser = ArgumentParser(prog="shardrec train")
    add_train_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    config, resume_dir = resolve_config(args, split_overrides(extra))
    return config, resume_dir, args.verbose


def resolve_config(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> tuple[RunConfig, Path | None]:
    """The run's config: a resumed run's saved config.json plus overrides, or --config plus overrides;
    with --warm-start, --config (or else the parent's config) plus overrides, naming the parent."""
    if getattr(args, "warm_start", None):
        return _warm_start_config(args, overrides), None
    if args.resume:
        resume_dir = Path(args.resume)
        saved = resume_dir / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {resume_dir}: not a run folder (no config.json)")
        try:
            config = config_from_json(saved.read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            raise UserError(f"--resume {resume_dir}: config.json is not a valid run config ({exc})") from None
        for key, value in overrides:
            config.set(key, parse_override_value(value))
        return config.validate(), resume_dir
    if not args.config:
        raise UserError("--config is required (or --resume RUN_DIR)")
    return load_config(args.config, overrides), None


def _warm_start_config(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> RunConfig:
    if args.resume:
        raise UserError("--warm-start starts a new run and --resume continues one: give one of them")
    parent = Path(args.warm_start).resolve()
    if args.config:
        config = load_config(args.config, overrides)
    else:
        config = parent_config(parent)
        config.trainer.run_name = ""  # the parent's own folder name would clash with it
        for key, value in overrides:
            config.set(key, parse_override_value(value))
    config.trainer.warm_start = str(parent)
    return config.validate()


def resolve_run_dir(config: RunConfig, resume_dir: Path | None) -> Path:
    """The run folder: the resumed one, or a new trainer.run_root/<name> (refused if it has checkpoints)."""
    if resume_dir is not None:
        return resume_dir.resolve()
    name = config.trainer.run_name or f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = (Path(config.trainer.run_root) / name).resolve()
    if (run_dir / "checkpoints").exists():
        raise UserError(f"run folder {run_dir} already has checkpoints: use --resume {run_dir} or another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
