"""`shardrec tune` on a Ray cluster: Ray Tune schedules the trials, and each trial is an ordinary
`shardrec train` process attached to the same cluster.

Why a process per trial rather than Ray Train called inside Tune's trial actor: a trial is then
exactly the run a user would start by hand (its own run folder, lock, preflight, failure lines and
exit code), a crash of one trial (a NaN loss, a rank killed for memory) ends that process and not
the search, and ending a trial is a signal the run already handles (SIGTERM: exit 143).

Resources: Ray Train reserves each trial's workers (and their shard tasks) itself when the trial
starts. The trial's own Tune actor only watches its process and asks for no CPU (a token of memory,
since Tune refuses an empty request), so the cluster's CPUs are shared out by the number of trials
run at once: `concurrent` x one trial's CPUs <= the cluster's, checked before any trial starts.

Early stopping: the trial's actor reads the run's validation records as they appear in
run/metrics.jsonl and reports each epoch to Tune; an ASHA scheduler stops a trial by ending its
actor, and the trial process, started to die with it (PR_SET_PDEATHSIG), gets SIGTERM.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from core.config import RunConfig
from core.search_space import Dimension, apply_values, check_concurrency
from core.toml_out import config_toml
from core.trial_table import (TRIAL_CONFIG, TRIAL_LOG, TRIAL_RECORD, TRIAL_RUN, TrialRow, read_trials,
                              validation_curve)

TRIAL_SETTINGS = {"eval.test": False, "trainer.keep_checkpoints": 1}
"""What a trial run sets beyond the searched values: no test ranking (a search must not see test
metrics), and one checkpoint kept (a search's trials are not resumed; the last checkpoint is kept for
`shardrec train --resume` or `export` of a trial worth keeping)."""

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""Where the shardrec packages live: a trial runs `python -m launcher train` from here."""

TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
POLL_S = 0.5
TRIAL_STOP_GRACE_S = 30.0


@dataclass
class SearchOptions:
    trials: int
    concurrent: int
    scheduler: str
    """"asha" (early stopping on the validation metric) or "fifo" (every trial runs all its epochs)."""
    metric: str
    """The validation metric without its split, e.g. "ndcg@10"."""
    grace_epochs: int = 2
    reduction_factor: int = 3
    seed: int = 0
    start_point: dict[str, Any] | None = None
    """Values the first trial takes instead of a draw (--include-base: the base config's own)."""


def trial_name(trial_id: str) -> str:
    """trial-007 for Tune's 7th trial (its id ends in a 5-digit counter)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return f"trial-{int(tail):03d}" if tail.isdigit() else f"trial-{trial_id}"


def trial_config(base: RunConfig, values: dict[str, Any], folder: Path, gcs_address: str) -> RunConfig:
    """The config a trial trains: `base`, the trial's values, TRIAL_SETTINGS, its run folder, and the
    search's cluster."""
    config = apply_values(base, {**values, **TRIAL_SETTINGS})
    config.trainer.run_root, config.trainer.run_name = str(folder), TRIAL_RUN
    config.cluster.address = gcs_address
    return config


def _die_with_parent() -> None:
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the trial's actor ends, even by SIGKILL


_PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # looked up before any fork: the child only calls it


def _error_line(log: Path) -> str:
    """The trial's own one-line error: the last `shardrec: error:` line of its output, else its last line."""
    if not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("shardrec: error:"):
            return line.removeprefix("shardrec: error:").strip()
    return lines[-1] if lines else ""


class TrialFailed(RuntimeError):
    pass


def run_trial(values: dict[str, Any], setup: dict[str, Any]) -> None:
    """Body of a trial's Tune actor: train one config as a `shardrec train` process, report its
    validation per epoch, and record the outcome in the trial's folder."""
    folder = Path(setup["trials_dir"]) / trial_name(tune.get_context().get_trial_id())
    folder.mkdir(parents=True, exist_ok=True)
    config = trial_config(RunConfig.from_dict(json.loads(setup["base_json"])), values, folder, setup["gcs_address"])
    header = f"trial {folder.name} of the search in {Path(setup['trials_dir']).parent}: " + \
             ", ".join(f"{key} = {value!r}" for key, value in values.items())
    (folder / TRIAL_CONFIG).write_text(config_toml(config, header))
    record: dict[str, Any] = {"trial": folder.name, "values": values, "started_at": time.time(),
                              "last_report_at": None, "ended_at": None, "exit_code": None, "error": None}

    def save() -> None:
        staging = folder / (TRIAL_RECORD + ".tmp")
        staging.write_text(json.dumps(record, indent=1))
        staging.replace(folder / TRIAL_RECORD)

    save()
    command = [sys.executable, "-m", "launcher", "train", "--config", str(folder / TRIAL_CONFIG)]
    with (folder / TRIAL_LOG).open("w") as log:
        process = subprocess.Popen(command, cwd=setup["project_root"], env=setup["env"], stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    metric, last_epoch, reported = setup["metric"], config.trainer.epochs, 0
    try:
        while True:
            done = process.poll() is not None
            curve = validation_curve(folder / TRIAL_RUN, metric)
            if done:  # recorded before the last reports: the scheduler may end this actor on any of them
                record.update(ended_at=time.time(), exit_code=process.returncode)
                if process.returncode != 0:
                    record["error"] = _error_line(folder / TRIAL_LOG) or f"exit code {process.returncode}"
                elif not curve:
                    record.update(exit_code=1, error="the run reported no validation result")
                save()
            pending = curve[reported:]
            if pending and not done and pending[-1][0] >= last_epoch:
                # The last epoch is reported once the run has exited: a scheduler stops a trial at
                # its last epoch, which would end the run while it writes its checkpoint and summary.
                pending = pending[:-1]
            for epoch, value in pending:
                record["last_report_at"] = time.time()
                save()
                tune.report({f"valid.{metric}": value, "epoch": epoch})
            reported += len(pending)
            if done:
                break
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:  # this thread is being ended: the trial ends with it
            process.terminate()
            try:
                process.wait(TRIAL_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if record["exit_code"] != 0:
        raise TrialFailed(record["error"])


def _domain(dimension: Dimension) -> Any:
    if dimension.kind == "choice":
        return tune.choice(list(dimension.values))
    low, high = dimension.values
    if dimension.integer:
        return (tune.randint if dimension.kind == "uniform" else tune.lograndint)(low, high + 1)
    return (tune.uniform if dimension.kind == "uniform" else tune.loguniform)(low, high)


class _Progress(tune.Callback):
    """One console line per trial start, validation result and end."""

    def __init__(self, say: Callable[[str], None], metric: str, total: int, trials_dir: Path) -> None:
        self.say, self.metric, self.total, self.trials_dir = say, metric, total, trials_dir

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = ", ".join(f"{key} {value!r}" for key, value in trial.config.items())
        self.say(f"{trial_name(trial.trial_id)} of {self.total} started: {values}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.say(f"{trial_name(trial.trial_id)}: epoch {result.get('epoch')} valid {self.metric} "
                 f"{result.get(f'valid.{self.metric}', float('nan')):.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"{trial_name(trial.trial_id)} ended")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial_name(trial.trial_id)
        try:
            error = json.loads((self.trials_dir / name / TRIAL_RECORD).read_text()).get("error") or ""
        except (OSError, ValueError):
            error = ""
        self.say(f"{name} failed (the search goes on){': ' + error if error else ''}")


class _StopRequest(tune.Stopper):
    """Ends the search when asked (a first Ctrl-C or SIGTERM): Tune starts no new trial and stops the
    running ones; finished trials' results stay."""

    def __init__(self) -> None:
        self.requested = False  # a plain flag: Tune pickles its stopper with the experiment's state

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.requested


class _GracefulSignals:
    """While the search runs: a first SIGINT or SIGTERM asks Tune to stop (trials end, the table is
    written); a second ends the command at once."""

    def __init__(self, stopper: _StopRequest, say: Callable[[str], None]) -> None:
        self.stopper, self.say, self.received = stopper, say, []
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_GracefulSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            raise SystemExit(128 + signum)
        self.stopper.requested = True
        self.say(f"{signal.Signals(signum).name}: stopping the search; running trials end, finished ones are "
                 "kept (send it again to stop at once)")


def run_search(base: RunConfig, dimensions: list[Dimension], options: SearchOptions, tune_dir: Path,
               per_trial_cpus: float, say: Callable[[str], None] = print) -> tuple[list[TrialRow], int | None]:
    """Run the search on the cluster this process is connected to; returns every trial's row and
    the signal that interrupted the search (None if it ran to its end)."""
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    check_concurrency(options.concurrent, per_trial_cpus, cluster_cpus,
                      "the cluster" if base.cluster.address else "this machine's embedded cluster")
    trials_dir = tune_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    setup = {
        "trials_dir": str(trials_dir.resolve()),
        "base_json": base.to_json(),
        "gcs_address": ray.get_runtime_context().gcs_address,
        "metric": options.metric,
        "project_root": str(PROJECT_ROOT),
        "env": {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])},
    }
    tune_metric = f"valid.{options.metric}"
    if options.scheduler == "asha":
        scheduler: Any = ASHAScheduler(time_attr="epoch", metric=tune_metric, mode="max", max_t=base.trainer.epochs,
                                       grace_period=min(options.grace_epochs, base.trainer.epochs),
                                       reduction_factor=options.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    stopper = _StopRequest()
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # _GracefulSignals handles Ctrl-C, SIGTERM too
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0 Tune then prints no banner: _Progress reports
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, setup=setup), TRIAL_ACTOR_RESOURCES),
        param_space={dimension.key: _domain(dimension) for dimension in dimensions},
        tune_config=tune.TuneConfig(num_samples=options.trials, scheduler=scheduler, reuse_actors=False,
                                    # the generator itself caps trials at once: Tune ignores
                                    # max_concurrent_trials when given a ready-made generator
                                    search_alg=BasicVariantGenerator(
                                        random_state=options.seed, max_concurrent=options.concurrent,
                                        points_to_evaluate=[options.start_point] if options.start_point else None)),
        run_config=tune.RunConfig(storage_path=str(tune_dir.resolve()), name="ray-tune", verbose=0, stop=stopper,
                                  callbacks=[_Progress(say, options.metric, options.trials, trials_dir)],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    # A failed trial's traceback and Tune's closing "did not complete" list would bury the one-line
    # reasons that _Progress prints and the table shows; Tune's own failures still raise from fit().
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.CRITICAL)
    try:
        with _GracefulSignals(stopper, say) as signals:
            tuner.fit()
    finally:
        tune_log.setLevel(level)
    interrupted = signals.received[0] if signals.received else None
    planned = [f"trial-{index:03d}" for index in range(options.trials)]
    rows = read_trials(trials_dir, options.metric, interrupted is not None, planned if interrupted else None)
    return rows, interrupted
