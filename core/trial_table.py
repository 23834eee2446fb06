"""The trials of a `shardrec tune` search, read back from their folders: status, searched values,
best validation, epochs and wall time; the best trial; the table printed and saved.

A trial's folder (TUNE_DIR/trials/NAME) holds its config.toml, trial.json (what the trial's driver
recorded: values, start, last report, exit code, error) and run/, an ordinary run folder. Only the
validation records of run/metrics.jsonl are read (`validation_curve`): the search chooses by
validation, and its trials do not rank the test split at all (eval.test false).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.search_space import short_name

TRIAL_RECORD = "trial.json"
TRIAL_CONFIG = "config.toml"
TRIAL_RUN = "run"
TRIAL_LOG = "train.log"

FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED, NOT_STARTED = (
    "finished", "stopped early", "failed", "interrupted", "not started")


@dataclass
class TrialRow:
    name: str
    status: str
    values: dict[str, Any]
    best: float | None = None
    """The trial's best value of the searched validation metric."""
    best_epoch: int | None = None
    epochs: int = 0
    """Epochs with a validation result."""
    wall_s: float | None = None
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)


def validation_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of validation metric `metric` (e.g. "ndcg@10") at each evaluated epoch, from
    the run's metrics.jsonl. Nothing but `valid_` values is read."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    curve, epoch = [], None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written as we read
        if record.get("kind") == "epoch":
            epoch = record.get("epoch")
        elif record.get("kind") == "eval" and epoch is not None and f"valid_{metric}" in record:
            curve.append((int(epoch), float(record[f"valid_{metric}"])))
    return curve


def read_trial(folder: Path, metric: str, interrupted: bool) -> TrialRow:
    """One trial's row. A trial whose driver recorded no exit code was ended from outside: by the
    scheduler (stopped early) or, when the search was interrupted, by that."""
    record = json.loads((folder / TRIAL_RECORD).read_text())
    curve = validation_curve(folder / TRIAL_RUN, metric)
    if record.get("exit_code") == 0:
        status = FINISHED
    elif record.get("exit_code") is not None:
        status = FAILED
    else:
        status = INTERRUPTED if interrupted else STOPPED_EARLY
    row = TrialRow(folder.name, status, record.get("values", {}), epochs=len(curve), curve=curve,
                   error=record.get("error") or "")
    finite = [(value, epoch) for epoch, value in curve if math.isfinite(value)]
    if finite:
        row.best, row.best_epoch = max(finite, key=lambda pair: (pair[0], -pair[1]))
    ended = record.get("ended_at") or record.get("last_report_at")
    if ended and record.get("started_at"):
        row.wall_s = ended - record["started_at"]
    return row


def read_trials(trials_dir: Path, metric: str, interrupted: bool, planned: list[str] | None = None) -> list[TrialRow]:
    """Every trial under `trials_dir` in start order, and a "not started" row for each name of
    `planned` without a folder."""
    rows = [read_trial(folder, metric, interrupted) for folder in sorted(trials_dir.iterdir())
            if (folder / TRIAL_RECORD).is_file()] if trials_dir.is_dir() else []
    seen = {row.name for row in rows}
    rows += [TrialRow(name, NOT_STARTED, {}) for name in planned or [] if name not in seen]
    return rows


def best_trial(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest validation result (the earlier one on a tie); None if none has one."""
    scored = [row for row in rows if row.best is not None]
    return max(scored, key=lambda row: row.best) if scored else None


def table_rows(rows: list[TrialRow], keys: list[str], metric: str) -> list[dict[str, str]]:
    """The table's cells, best validation first, one column per searched key."""
    ordered = sorted(rows, key=lambda row: (row.best is None, -(row.best or 0.0), row.name))
    out = []
    for row in ordered:
        cells = {"trial": row.name, "status": row.status}
        for key in keys:
            cells[short_name(key, keys)] = _cell(row.values.get(key, ""))
        cells[f"valid {metric}"] = "" if row.best is None else f"{row.best:.4f}"
        cells["best epoch"] = "" if row.best_epoch is None else str(row.best_epoch)
        cells["epochs"] = str(row.epochs)
        cells["wall s"] = "" if row.wall_s is None else f"{row.wall_s:.0f}"
        cells["error"] = row.error
        out.append(cells)
    return out


ERROR_WIDTH = 100
"""The printed table cuts errors to this many characters; trials.csv and each trial's train.log keep them whole."""


def format_table(cells: list[dict[str, str]]) -> str:
    """Aligned text columns (the error column last, unpadded, and cut to ERROR_WIDTH)."""
    if not cells:
        return "(no trials)"
    cells = [{**row, "error": _cut(row.get("error", ""))} for row in cells]
    columns = list(cells[0])
    widths = {column: max(len(column), *(len(row[column]) for row in cells)) for column in columns}
    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].ljust(widths[c]) if c != "error" else values[c] for c in columns).rstrip()
    return "\n".join([line({c: c for c in columns}), *(line(row) for row in cells)])


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_WIDTH else text[:ERROR_WIDTH - 3] + "..."


def table_csv(cells: list[dict[str, str]]) -> str:
    out = io.StringIO()
    if cells:
        writer = csv.DictWriter(out, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    return out.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
