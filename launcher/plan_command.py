"""`shardrec plan`: sharding-plan experiments from a model config or a table-spec file.

A model config is planned exactly as `shardrec train` plans it (the same model with its table
optimizer, the config's batch size, reservation and constraints, through sharding.planner.plan_tables):
only the cluster differs, and on the cluster the job runs on the plans are identical.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

from core.config import RunConfig, load_config
from core.dataset_format import PreparedDataset
from core.errors import UserError
from sharding.experiment import STRATEGIES, PlanInfeasible, run_plan
from sharding.plan_io import save_plan
from sharding.report import format_comparison, format_report, write_json, write_png
from sharding.tables import TableSpec, read_table_specs, specs_from_module
from sharding.topology import load_topology
from models.managed_ids import managed_table_names
from trainers.sharded_model import model_for_sharding


def _model_from_config(config: RunConfig, users: int | None, items: int | None) -> nn.Module:
    try:
        dataset = PreparedDataset.open(config.data.path)
    except UserError as exc:
        if users is None or items is None:
            raise UserError(f"{exc}; or give the table sizes with --users and --items") from None
        dataset = None  # explicit sizes and no dataset: ID tables only, no side-feature tables
    users = users or dataset.num_users
    items = items or dataset.num_items
    features = dataset.stats.get("features") if dataset is not None else None
    return model_for_sharding(config, users, items, features)


def run_plan_command(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    per_table: dict[str, str] = {}
    module: nn.Module | None = None
    reserve, batch_size = args.reserve, args.batch_size
    if args.config:
        config = load_config(args.config, overrides)
        module = _model_from_config(config, args.users, args.items)
        specs: list[TableSpec] = specs_from_module(module)
        per_table = dict(config.sharding.tables)
        if config.sharding.default and args.strategy == "planner":
            per_table = {s.name: per_table.get(s.name, config.sharding.default) for s in specs}
        managed = managed_table_names(module)
        if managed:
            # Managed-collision tables are planned as the plain tables of their rows they hold,
            # row-wise as training shards them (from their specs alone: the module's id remapping
            # is split for the job's own world size when it trains).
            for name in managed:
                if per_table.get(name, "row_wise") != "row_wise":
                    raise UserError(f"{name} is a managed-collision table ([ids]): it can only be row_wise, "
                                    f"not {per_table[name]}")
                per_table[name] = "row_wise"
            module = None
        # What training would use, unless the command line says otherwise.
        reserve = config.sharding.reserve if reserve is None else reserve
        batch_size = config.trainer.batch_size if batch_size is None else batch_size
    else:
        if overrides:
            raise UserError("--section.key overrides need --config")
        if args.users or args.items:
            raise UserError("--users/--items apply to --config; a table-spec file gives its own sizes")
        specs = read_table_specs(args.tables)
    reserve = 0.15 if reserve is None else reserve
    batch_size = 512 if batch_size is None else batch_size
    if not 0 <= reserve < 1:
        raise UserError("--reserve must be in [0, 1)")
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    topologies = [load_topology(t) for t in args.topology]
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    if args.compare or len(topologies) > 1:
        options = [(t, s) for t in topologies for s in (STRATEGIES if args.compare else [args.strategy])]
        rows = []
        for topology, strategy in options:
            label = strategy if len(topologies) == 1 else f"{topology.name}/{strategy}"
            try:
                report = run_plan(specs, topology, strategy, per_table if strategy == "planner" else None,
                                  reserve, batch_size, module)
                rows.append({"label": label, "report": report})
            except PlanInfeasible as exc:
                rows.append({"label": label, "error": str(exc)})
        print(format_comparison(rows))
        for row in rows:
            if "error" in row and "\n" in row["error"]:
                print(f"\n{row['label']}: {row['error']}")
        if out:
            dump = [{"label": r["label"], **({"error": r["error"]} if "error" in r else r["report"].to_dict())} for r in rows]
            (out / "comparison.json").write_text(json.dumps(dump, indent=1) + "\n")
            for row in rows:
                if "report" in row:
                    write_png(row["report"], out / f"report-{row['label'].replace('/', '-')}.png")
            print(f"\nwrote {out}/comparison.json and one report-*.png per option that fits")
        return 0 if any("report" in r for r in rows) else 2

    report = run_plan(specs, topologies[0], args.strategy, per_table, reserve, batch_size, module)
    print(format_report(report))
    if out:
        save_plan(report.plan, out / "plan.json", topologies[0].world_size, topologies[0].device)
        write_json(report, out / "report.json")
        write_png(report, out / "report.png")
        print(f"\nwrote {out}/plan.json (train with --sharding.plan), report.json, report.png")
    return 0
