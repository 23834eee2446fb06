"""The run's words on the console: one line per epoch, and the report at the end of a run."""

from __future__ import annotations

from typing import Any

from sharding.planner import format_plan

EPOCH_LINE_METRICS = {"recall": "Recall", "ndcg": "NDCG", "hit": "Hit", "mrr": "MRR",
                      "sampled_hit": "sampled-Hit", "sampled_ndcg": "sampled-NDCG"}


def epoch_line(record: dict[str, Any], k: int, with_test: bool = True) -> str:
    line = (
        f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['steps']} steps, "
        f"{record['samples_per_s']:,.0f} samples/s, data wait {record.get('data_wait_frac', 0.0):.0%}"
    )
    if record.get("nonfinite_skipped"):
        line += f", {record['nonfinite_skipped']} batch(es) with a non-finite loss left out"
    if "valid" in record:
        line += f" | valid NDCG@{k} {record['valid'][f'ndcg@{k}']:.4f}"
    if "test" in record:
        t = record["test"]
        line += " | test"
        for name, label in EPOCH_LINE_METRICS.items():
            if f"{name}@{k}" in t:
                line += f" {label}@{k} {t[f'{name}@{k}']:.4f}"
    elif "valid" in record:
        line += " | test not run (validation did not improve)" if with_test else ""
    return line


def format_summary(summary: dict[str, Any], started_at: float | None = None) -> str:
    """Human-readable end-of-run report. `started_at`: when the command started (wall clock), for
    the time to the best epoch."""
    best, final = summary["best"], summary["final"]
    lines = [f"shardrec run: {summary['model']} on {summary['world_size']} rank(s)", "sharding plan:", format_plan(summary["plan"])]
    lines.append(f"epochs: {summary['epochs']}; final loss {final.get('loss', float('nan')):.4f}; "
                 f"last epoch {final.get('samples_per_s', 0):,.0f} samples/s")
    if best and "test" not in best:
        valid = best["valid"]
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in valid.items() if "@" in name)
        lines.append(f"validation at its best epoch {best['epoch']} ({valid['protocol']}): {metrics}; "
                     "test not ranked (eval.test false)")
    elif best:
        test = best["test"]
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in test.items() if "@" in name)
        ranked = (f"{test['users']} of {test['eligible_users']} users" if "users" in test and test["users"] != test.get("eligible_users")
                  else f"{test['cases']} cases")
        lines.append(f"test at best validation epoch {best['epoch']} ({test['protocol']}; {ranked}): {metrics}")
        reached = best.get("reached_at")
        if started_at is not None and reached is not None and reached >= started_at:  # not from before a resume
            lines.append(f"time to best: {reached - started_at:.1f} s (command start to the end of epoch "
                         f"{best['epoch']}'s test evaluation)")
    lines.append(f"run folder: {summary['run_dir']}")
    if summary.get("parents"):
        chain = summary["parents"]
        lines.append(f"warm-started from {chain[0]}" + (f" ({len(chain) - 1} run(s) before it: "
                                                           f"{' <- '.join(chain[1:])})" if len(chain) > 1 else ""))
    return "\n".join(lines)
