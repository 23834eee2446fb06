"""Plan reports for people: text tables, JSON and a PNG (per-rank stacked memory bars and a
table-by-rank placement map)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sharding.experiment import PlanReport
from sharding.topology import GIB

MAX_RANK_ROWS = 16  # text shows the fullest ranks beyond this many


def format_report(report: PlanReport) -> str:
    t = report.totals()
    lines = [
        f"cluster  {report.topology.describe()}",
        f"strategy {report.strategy}; {report.reserve:.0%} of each rank's memory reserved "
        f"({t['reserved_gib_per_rank']:.1f} GiB); planned in {report.planning_s:.2f} s",
        "",
        f"{'table':<20}{'rows':>16}{'dim':>6}  {'sharding':<16}{'kernel':<20}{'shards':>7}  ranks",
    ]
    for row in report.tables:
        lines.append(
            f"{row['table']:<20}{row['rows']:>16,}{row['dim']:>6}  {row['sharding_type']:<16}"
            f"{row['compute_kernel']:<20}{row['num_shards']:>7}  {_ranks(row['ranks'])}"
        )
    lines += ["", f"{'rank':>6}{'weights GiB':>13}{'optim GiB':>11}{'other GiB':>11}{'total GiB':>11}"
                  f"{'host GiB':>10}{'compute ms':>12}{'comms ms':>10}"]
    ranks = report.ranks
    if len(ranks) > MAX_RANK_ROWS:
        ranks = sorted(ranks, key=lambda r: -r.device_total)[:MAX_RANK_ROWS]
        lines.append(f"  ({MAX_RANK_ROWS} fullest of {len(report.ranks)} ranks; all ranks are in the JSON)")
    for r in sorted(ranks, key=lambda r: r.rank):
        lines.append(
            f"{r.rank:>6}{r.weights / GIB:>13.3f}{r.optimizer / GIB:>11.3f}{r.other / GIB:>11.3f}"
            f"{r.device_total / GIB:>11.3f}{r.host / GIB:>10.3f}{r.compute_ms:>12.3f}{r.comms_ms:>10.3f}"
        )
    lines += [
        "",
        f"totals: weights {t['weights_gib']:,.2f} GiB, optimizer state {t['optimizer_gib']:,.2f} GiB, "
        f"host (UVM) {t['host_gib_total']:,.2f} GiB",
        f"fullest rank {t['device_gib_max_rank']:,.2f} of {t['capacity_gib_per_rank'] - t['reserved_gib_per_rank']:,.1f} "
        f"GiB usable; memory imbalance (max/mean) {t['memory_imbalance']:.2f}; "
        f"slowest rank {t['step_ms_max_rank']:.3f} ms/step (estimate), perf imbalance {t['perf_imbalance']:.2f}",
    ]
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 6:
        return f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"
    return ",".join(map(str, ranks))


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """rows: {label, report or error}."""
    lines = [f"{'option':<28}{'fits':<6}{'fullest rank GiB':>18}{'mem imbalance':>15}{'slowest ms':>12}  notes"]
    for row in rows:
        if "error" in row:
            reason = row["error"].splitlines()[0]
            lines.append(f"{row['label']:<28}{'no':<6}{'-':>18}{'-':>15}{'-':>12}  {reason}")
            continue
        t = row["report"].totals()
        kinds = sorted({tb["sharding_type"] for tb in row["report"].tables})
        lines.append(
            f"{row['label']:<28}{'yes':<6}{t['device_gib_max_rank']:>18.3f}{t['memory_imbalance']:>15.2f}"
            f"{t['step_ms_max_rank']:>12.3f}  {', '.join(kinds)}"
        )
    return "\n".join(lines)


def write_json(report: PlanReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")


def write_png(report: PlanReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ranks = report.ranks
    x = np.arange(len(ranks))
    figure, (bars, placement) = plt.subplots(
        2, 1, figsize=(max(8, min(24, 0.35 * len(ranks) + 4)), 9), gridspec_kw={"height_ratios": [1, 1.2]}
    )
    bottom = np.zeros(len(ranks))
    parts = [("weights", [r.weights for r in ranks]), ("optimizer state", [r.optimizer for r in ranks]),
             ("other (planner estimate)", [r.other for r in ranks]), ("reserved", [report.reserved] * len(ranks))]
    for label, values in parts:
        values = np.array(values, dtype=float) / GIB
        bars.bar(x, values, bottom=bottom, label=label, width=0.8 if len(ranks) < 200 else 1.0)
        bottom += values
    bars.axhline(report.capacity / GIB, color="black", linestyle="--", linewidth=1, label="capacity")
    bars.set_ylabel("GiB per rank")
    bars.set_xlabel("rank")
    bars.set_title(f"{report.topology.name}: memory per rank ({report.strategy})")
    bars.legend(loc="upper right", fontsize=8)

    share = np.zeros((len(report.tables), len(ranks)))
    for i, table in enumerate(report.tables):
        total = table["rows"] * table["dim"]
        for shard in table["shards"]:
            share[i, shard["rank"]] += shard["sizes"][0] * shard["sizes"][1] / total
    image = placement.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    placement.set_yticks(range(len(report.tables)))
    placement.set_yticklabels([f"{t['table']} ({t['sharding_type']})" for t in report.tables], fontsize=8)
    placement.set_xlabel("rank")
    placement.set_title("share of each table held by each rank")
    figure.colorbar(image, ax=placement, fraction=0.03)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
