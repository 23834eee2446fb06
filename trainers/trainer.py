"""One rank's training, in the manner of torchtitan's trainer: build (model, sharding, optimizers),
`train_step(batch)`, `evaluate(split)`, `state_dict` / `load_state_dict`, and `fit`, the epoch loop
that calls the step. The step is where a TorchRec train pipeline plugs in.

It knows nothing of Ray or torchrun: the launcher hands it a RankContext and a BatchSource.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from core.config import RunConfig
from core.dataset_format import PreparedDataset
from core.model_params import is_sequence_model
from core.run_folder import checkpoint_dir, complete_checkpoints, latest_checkpoint, read_progress
from sharding.plan_io import plan_to_dict
from sharding.planner import format_plan
from trainers import checkpoint
from trainers.batches import Batch, BatchSource, check_ids, lockstep, planned_batches, to_tensors
from trainers.distributed import RankContext, all_min, all_sum, node_address
from trainers.evaluate import Evaluator
from trainers.memory import local_bytes, peak_rss_mb
from trainers.prefetch import Prefetcher
from trainers.steps import SparseDistSteps, choose_step
from models.features import FeatureBatch
from trainers.run_log import Console, RunLog
from trainers.sharded_model import ShardedModel, build_sharded_model


class Trainer:
    """Collective where it says so: every rank builds one with the same config and calls the same
    methods in the same order."""

    def __init__(self, config: RunConfig, context: RankContext, dataset: PreparedDataset) -> None:
        # TorchRec still calls collectives that torch marks deprecated: one warning per call site and rank.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        self.config, self.context, self.dataset = config, context, dataset
        self.sharded: ShardedModel = build_sharded_model(config, dataset, context)  # collective
        self.evaluator = Evaluator(dataset, config.eval, context.rank, context.world_size, seed=config.trainer.seed,
                                   sequence_model=is_sequence_model(config.model.resolved_params()))
        self.epoch = 0
        """Epochs finished."""
        self.step = 0
        """Optimizer steps taken, all epochs."""
        self.epoch_batches = 0
        """Batches trained in the epoch under way (a checkpoint inside an epoch resumes after them)."""
        self.peak_rss_before_checkpoint_mb: float | None = None
        """Peak RSS before the first checkpoint: DCP copies each table shard while saving it (views
        of FBGEMM's flat weight buffer are cloned), so the peak after it carries one shard more."""
        self.first_step_at: float | None = None
        """Wall clock at the end of this process's first training step (start-up benchmarks)."""
        self.saver: checkpoint.AsyncSaver | None = None
        """Background checkpoint writer (trainer.async_checkpoints), made at the first save."""
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.step_kind = choose_step(config.trainer.train_pipeline, self.sharded.model, context.device)
        """"plain" or "sparse_dist" (trainers/steps.py)."""
        self._pipeline: SparseDistSteps | None = None
        self._ahead: tuple[int, Prefetcher] | None = None
        """(epoch, its prefetcher), started during the previous epoch's last steps (`train_epoch`'s
        `upcoming`), so an epoch's first batch is ready when it starts."""

    # --- the step and the evaluation ---------------------------------------------------------------

    def train_step(self, batch: Batch) -> torch.Tensor:
        """Collective. One optimizer step on this rank's batch (numpy columns); returns the batch's
        loss, detached and left on the device (reading it syncs, so the caller decides when)."""
        return self.step_on_tensors(self.prepare_batch(batch)[1])

    def prepare_batch(self, batch: Batch, device: torch.device | None = None) -> tuple[Batch, dict[str, torch.Tensor]]:
        """(batch, its tensors on `device`, default the rank's), after refusing out-of-range ids.
        Thread-safe: the epoch loop runs it in its prefetch thread."""
        check_ids(batch, self.dataset.num_users, self.dataset.num_items)
        return batch, to_tensors(batch, device or self.context.device)

    def precision(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast (trainer.mixed_precision); the loss comes out in fp32."""
        if self.config.trainer.mixed_precision == "bf16":
            return torch.autocast(self.context.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_pipeline_batch(self, batch: Batch) -> tuple[Batch, FeatureBatch]:
        """(batch, its FeatureBatch in host memory, pinned for a GPU): the train pipeline copies
        it to the device on a stream of its own."""
        batch, tensors = self.prepare_batch(batch, device=torch.device("cpu"))
        features = self.sharded.model.pipeline_input(tensors)
        assert features is not None  # choose_step checked the model
        return batch, features.pin_memory() if self.context.device.type == "cuda" else features

    def _plain_steps(self, prepared: Iterator[tuple[Batch, dict[str, torch.Tensor]]]) -> Iterator[tuple[Batch, torch.Tensor]]:
        for batch, tensors in prepared:
            yield batch, self.step_on_tensors(tensors)

    def _pipelined_steps(self, prepared: Iterator[tuple[Batch, FeatureBatch]]) -> Iterator[tuple[Batch, torch.Tensor]]:
        if self._pipeline is None:
            self._pipeline = SparseDistSteps(self.sharded.dmp, self.sharded.optimizer, self.context.device,
                                             self.precision)
        for batch, loss in self._pipeline.epoch(prepared):
            self.step += 1
            yield batch, loss

    def step_on_tensors(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Collective. train_step on a batch already on the device (see prepare_batch)."""
        with self.precision():
            loss = self.sharded.dmp(tensors)
        self.sharded.optimizer.zero_grad()
        loss.backward()
        self.sharded.optimizer.step()
        self.step += 1
        return loss.detach()

    def evaluate(self, split: str, on_batch: Callable[[int], None] | None = None,
                 keep_ranking: bool = False) -> dict[str, Any]:
        """Collective. Ranking metrics on `split` ("valid" or "test"); keep_ranking: the model may keep
        its ranking state for another split at the same weights (then end_ranking() drops it)."""
        return self.evaluator.evaluate(self.sharded.model, split, on_batch, keep_ranking)

    # --- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state (sharded tensors: each rank holds its own shards)."""
        return {"model": self.sharded.dmp.state_dict(), "optim": self.sharded.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sharded.dmp.load_state_dict(state["model"])
        if "optim" in state:
            self.sharded.optimizer.load_state_dict(state["optim"])

    def progress(self) -> dict[str, Any]:
        """Where training stands, JSON-serialisable: saved beside each checkpoint."""
        return {"epoch": self.epoch, "step": self.step, "epoch_batches": self.epoch_batches, "best": self.best,
                "history": self.history, "config": self.config.to_dict()}

    def save_checkpoint(self, run_dir: Path, log: RunLog | None = None) -> Path:
        """Collective. At an epoch end, or inside an epoch (then named by step). Logs how long the
        step was blocked (`checkpoint_block_s`) and applies trainer.keep_checkpoints once the
        checkpoint is complete. With trainer.async_checkpoints the step waits only for the state's
        copy to host memory (and for the previous save, if still being written)."""
        inside = self.epoch_batches > 0
        path = checkpoint_dir(run_dir, self.epoch, self.step if inside else None)
        if self.peak_rss_before_checkpoint_mb is None:
            self.peak_rss_before_checkpoint_mb = peak_rss_mb()
        started = time.perf_counter()
        if self.config.trainer.async_checkpoints:
            if self.saver is None:
                self.saver = checkpoint.AsyncSaver(on_complete=lambda _: self._retain_checkpoints(run_dir))
            self.saver.save(self.state_dict(), path, self.progress())
        else:
            checkpoint.save(self.state_dict(), path, self.progress())
            if self.context.is_main:
                self._retain_checkpoints(run_dir)
        blocked = time.perf_counter() - started
        if log is not None:
            log.record("checkpoint", self.step, {"path": str(path), "checkpoint_block_s": blocked,
                                                 "async": self.config.trainer.async_checkpoints})
        return path

    def finish_checkpoints(self) -> None:
        """Collective. Wait for a checkpoint still being written (asynchronous saves)."""
        if self.saver is not None:
            self.saver.wait()

    def _retain_checkpoints(self, run_dir: Path) -> None:
        """Rank 0: trainer.keep_checkpoints, never deleting the best-validation checkpoint."""
        keep_count = self.config.trainer.keep_checkpoints
        if not keep_count:
            return
        complete = complete_checkpoints(run_dir)
        keep = {folder for _, folder in complete[-keep_count:]}
        if self.best:
            keep.add(checkpoint_dir(run_dir, self.best["epoch"]))
        for _, folder in complete:
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Collective. Weights, optimizer state, RNG states and progress."""
        # Adam creates its moments lazily at the first step; DCP loads in place, into the tensors the
        # state dict already holds, so without them a resumed run would restart Adam from zero.
        # init_state takes a zero-gradient step that leaves the weights as they are.
        for name, optimizer in self.sharded.optimizer.optimizers:
            if name == "dense":
                optimizer.init_state()
        state = self.state_dict()
        progress = checkpoint.load(state, path)
        self.load_state_dict(state)
        self.epoch, self.step = progress["epoch"], progress["step"]
        self.epoch_batches = int(progress.get("epoch_batches", 0))
        self.best, self.history = progress.get("best", {}), progress.get("history", [])

    # --- the loop ----------------------------------------------------------------------------------

    def rank_resources(self) -> list[dict[str, Any]]:
        """Collective: per rank, its peak RSS, the MiB of its table shards and optimizer state, the
        CPUs it is bound to (empty: unbound), and when its first step ended (what the scale
        benchmark compares across dataset sizes)."""
        state = local_bytes(self.sharded.dmp.state_dict()) + local_bytes(self.sharded.optimizer.state_dict())
        mine = {"rank": self.context.rank, "node_ip": node_address(), "peak_rss_mb": peak_rss_mb(), "state_mb": state / 2**20,
                "peak_rss_before_checkpoint_mb": self.peak_rss_before_checkpoint_mb or peak_rss_mb(),
                "cpus": list(self.context.cpus),
                "first_step_at": self.first_step_at}
        if self.context.world_size == 1:
            return [mine]
        every: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(every, mine)
        return every

    def train_epoch(self, batches: Iterator[Batch], log: RunLog, run_dir: Path | None = None,
                    planned: int | None = None, upcoming: Callable[[], Iterator[Batch]] | None = None
                    ) -> dict[str, Any]:
        """Collective. One epoch over `batches` (after the `epoch_batches` a resumed checkpoint had
        trained); returns its record (loss, steps, samples/s, data wait). `planned`: the number of
        batches this rank's source yields (planned_batches), when it can tell; the ranks then agree
        on the count once, and no step runs a collective of the loop's own. `upcoming`: the next
        epoch's batches, for a source whose epochs are independent of each other
        (`independent_epochs`): their preparation starts during this epoch's last steps, and the
        next train_epoch takes them over instead of `batches`."""
        self.sharded.dmp.train()
        epoch = self.epoch + 1
        log_every = self.config.trainer.log_every
        every_steps = self.config.trainer.checkpoint_every_steps
        skipped = self.epoch_batches
        max_steps = self.config.trainer.max_steps_per_epoch
        remaining: int | None = None
        if planned is not None:
            total = all_min(planned)  # every rank runs the shortest rank's count
            if max_steps:
                total = min(total, max_steps)
            remaining = max(total - skipped, 0)
        # The epoch's order is a function of (seed, epoch) under torchrun: skipping what the
        # checkpoint had trained resumes at the next unseen batch.
        source_batches = batches
        batches = itertools.islice(batches, skipped, None if remaining is None else skipped + remaining)
        ahead = self._take_ahead(epoch)
        if ahead is not None and (skipped or remaining is None):  # not an epoch read ahead can serve
            ahead.close()
            ahead = None
        recorder = BatchRecorder.from_environment(self.context.rank, epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.context.device)
        rows = steps = 0
        log.start_bar(f"epoch {epoch}", remaining, unit="step")
        # The pipeline pulls its batches itself (two ahead), so it needs the count agreed up front.
        pipelined = self.step_kind == "sparse_dist" and remaining is not None
        prepare = self.prepare_pipeline_batch if pipelined else self.prepare_batch
        depth = self.config.trainer.prefetch_batches
        with ahead or Prefetcher(batches, prepare, depth=depth) as prepared:
            if remaining is None:
                items: Iterator[Any] = iter(lockstep(prepared, max(max_steps - skipped, 1) if max_steps else 0))
            elif ahead is not None:  # it read its source whole: the agreed count is cut here
                items = itertools.islice(prepared, remaining)
            else:
                items = iter(prepared)
            timed = TimedIterator(items)
            steps_taken = self._pipelined_steps(iter(timed)) if pipelined else self._plain_steps(iter(timed))
            for batch, loss in steps_taken:
                if self.first_step_at is None:
                    self.first_step_at = time.time()
                    log.record("first_step", self.step, {"epoch": epoch})  # start-up benchmarks read its time
                self.epoch_batches += 1
                if recorder is not None:
                    recorder.record(self.step, batch)
                batch_rows = len(batch["user_id"])
                loss_sum += loss.double() * batch_rows
                rows += batch_rows
                steps += 1
                if self.step % log_every == 0:
                    value = float(loss)
                    log.record("step", self.step, {"epoch": epoch, "loss": value})
                    log.advance(loss=value)
                else:
                    log.advance()
                if every_steps and run_dir is not None and self.step % every_steps == 0:
                    self.save_checkpoint(run_dir, log)
                if upcoming is not None and remaining is not None and steps == max(remaining - depth, 1):
                    # `depth` steps before the end this epoch's batches are all prepared or queued:
                    # the next epoch's preparation overlaps the last steps instead of its first.
                    self._ahead = (epoch + 1, Prefetcher(upcoming(), prepare, depth=depth))
            waited = timed.waited
        close = getattr(source_batches, "close", None)
        if close is not None:  # a source left before its end (a step limit) releases what it reads from now
            close()
        log.end_bar()
        if remaining is not None and steps < remaining:
            # The source announced more batches than it gave: the other ranks are now waiting in a
            # step's collective. Failing here ends the job (the launchers stop every rank).
            raise RuntimeError(f"rank {self.context.rank}: the epoch's batch source ended after {steps} of the "
                               f"{remaining} batches it announced")
        elapsed = time.perf_counter() - started
        total_loss, total_rows = all_sum([float(loss_sum), float(rows)])
        self.epoch, self.epoch_batches = epoch, 0
        return {"epoch": epoch, "steps": steps, "loss": total_loss / max(total_rows, 1.0),
                "samples_per_s": total_rows / elapsed if elapsed > 0 else 0.0, "epoch_s": elapsed,
                "data_wait_frac": waited / elapsed if elapsed > 0 else 0.0}

    def _take_ahead(self, epoch: int | None) -> Prefetcher | None:
        """The prefetcher started ahead for `epoch`, if any; one for another epoch (every one, for
        None) is stopped."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead[0] != epoch:
            ahead[1].close()
            return None
        return ahead[1]

    def _fit_epochs(self, source: BatchSource, run_dir: Path, log: RunLog) -> None:
        """The epochs left: train, evaluate and checkpoint as the config says."""
        trainer_config, k = self.config.trainer, self.config.eval.k
        independent = bool(getattr(source, "independent_epochs", False))
        while self.epoch < trainer_config.epochs:
            epoch = self.epoch + 1
            upcoming = (functools.partial(source.epoch, epoch + 1)
                        if independent and epoch < trainer_config.epochs else None)
            record = self.train_epoch(source.epoch(epoch), log, run_dir, planned_batches(source, epoch), upcoming)
            last = self.epoch == trainer_config.epochs
            if self.epoch % trainer_config.eval_every == 0 or last:
                eval_started = time.perf_counter()
                record["valid"] = self.evaluate("valid", log.bar_callback("valid"), keep_ranking=True)
                # The test split is ranked only when validation improves: the reported test result is
                # the one at the best validation epoch, and the others would cost a full pass each.
                # At the same weights, it reuses what validation's ranking computed (LightGCN's layers).
                if not self.best or record["valid"][f"ndcg@{k}"] > self.best["valid"][f"ndcg@{k}"]:
                    record["test"] = self.evaluate("test", log.bar_callback("test"))
                    self.best = {"epoch": self.epoch, "valid": record["valid"], "test": record["test"],
                                 "reached_at": time.time()}
                else:
                    self.sharded.model.end_ranking()
                record["eval_s"] = time.perf_counter() - eval_started
            log.record("epoch", self.step, {key: v for key, v in record.items() if not isinstance(v, dict)})
            for split in ("valid", "test"):
                if split in record:
                    log.record("eval", self.step, {f"{split}_{m}": v for m, v in record[split].items()})
            log.info(epoch_line(record, k))
            self.history.append(record)
            if self.epoch % trainer_config.checkpoint_every == 0 or last:
                self.save_checkpoint(run_dir, log)

    def fit(self, source: BatchSource, run_dir: Path, resume: bool = False,
            console: Console | None = None) -> dict[str, Any]:
        """Collective. Train per the config, evaluating and checkpointing as it says; returns the run
        summary (identical on every rank; rank 0 writes it and the run folder's files, and speaks
        through `console`)."""
        latest = latest_checkpoint(run_dir) if resume else None
        if resume and latest is None:
            raise RuntimeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        if latest is not None and self.context.is_main:
            # A run that restarts repeats the steps after its last checkpoint: their records go.
            prune_metrics(run_dir / "metrics.jsonl", read_progress(latest)["step"])
        log = RunLog(run_dir, self.context.is_main, console)
        where = f"from {self.config.sharding.plan}" if self.config.sharding.plan else "by the TorchRec planner"
        log.info(f"sharding plan over {self.context.world_size} rank(s), {where}:\n{format_plan(self.sharded.plan_rows)}")
        log.info(f"training step: {self.step_kind}" + (" (TorchRec TrainPipelineSparseDist)" if self.step_kind == "sparse_dist" else ""))
        if self.context.cpus:
            log.info(f"each of the node's {self.context.local_world_size} ranks bound to its own CPUs (rank 0: "
                     f"{', '.join(map(str, self.context.cpus))}); cluster.bind_cpus false leaves them unbound")
        if self.context.is_main:
            (run_dir / "config.json").write_text(self.config.to_json() + "\n")
            plan = plan_to_dict(self.sharded.plan, self.context.world_size, self.context.device.type)
            (run_dir / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        if latest is not None:
            self.load_checkpoint(latest)
            log.info(f"resumed from {latest} (epoch {self.epoch}, step {self.step})")
        try:
            self._fit_epochs(source, run_dir, log)
        finally:
            self._take_ahead(None)  # stops a read-ahead an error left unused
        self.finish_checkpoints()
        close = getattr(source, "close", None)
        if close is not None:  # a source that reads ahead stops
            close()
        summary = {
            "run_dir": str(run_dir),
            "model": self.config.model.name,
            "world_size": self.context.world_size,
            "plan": self.sharded.plan_rows,
            "epochs": self.config.trainer.epochs,
            "history": self.history,
            "best": self.best,
            "final": self.history[-1] if self.history else {},
            "ranks": self.rank_resources(),
        }
        if self.context.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.close()
        return summary


class TimedIterator:
    """Passes `items` through, adding up the seconds spent waiting for each (`waited`)."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items, self.waited = items, 0.0

    def __iter__(self) -> Iterator[Any]:
        while True:
            asked = time.perf_counter()
            item = next(self.items, None)
            self.waited += time.perf_counter() - asked
            if item is None:
                return
            yield item


class BatchRecorder:
    """Testing aid for exactly-once progress, off unless SHARDREC_RECORD_BATCHES names a folder: each
    rank appends, per step, the (user, item) rows of its batch's positives to
    <folder>/rank-<r>.jsonl. With SHARDREC_FAIL_AT_STEP=<rank>:<step> that rank kills itself with
    SIGKILL right after that step (a lost host, for fault tests), once: a marker file in the folder
    stops a restarted job from failing at the same step again."""

    def __init__(self, path: Path, fail_at: int | None) -> None:
        self.path, self.fail_at = path, fail_at

    @classmethod
    def from_environment(cls, rank: int, epoch: int) -> "BatchRecorder | None":
        folder = os.environ.get("SHARDREC_RECORD_BATCHES")
        if not folder:
            return None
        fail_rank, _, fail_step = os.environ.get("SHARDREC_FAIL_AT_STEP", "").partition(":")
        fail_at = int(fail_step) if fail_step and int(fail_rank) == rank else None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"rank-{rank}.jsonl", fail_at)

    def record(self, step: int, batch: Batch) -> None:
        positive = batch["label"] > 0 if "label" in batch else slice(None)
        rows = {"step": step, "pid": os.getpid(), "users": batch["user_id"][positive].tolist(),
                "items": batch["item_id"][positive].tolist()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(rows) + "\n")
        if self.fail_at is not None and step == self.fail_at:
            marker = self.path.with_name(f"{self.path.stem}-killed-at-{step}")
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)


def prune_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics.jsonl records up to `last_step` (atomically: a crash keeps the old file)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    staging.replace(path)


EPOCH_LINE_METRICS = {"recall": "Recall", "ndcg": "NDCG", "hit": "Hit", "mrr": "MRR",
                      "sampled_hit": "sampled-Hit", "sampled_ndcg": "sampled-NDCG"}


def epoch_line(record: dict[str, Any], k: int) -> str:
    line = (
        f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['steps']} steps, "
        f"{record['samples_per_s']:,.0f} samples/s, data wait {record.get('data_wait_frac', 0.0):.0%}"
    )
    if "valid" in record:
        line += f" | valid NDCG@{k} {record['valid'][f'ndcg@{k}']:.4f}"
    if "test" in record:
        t = record["test"]
        line += " | test"
        for name, label in EPOCH_LINE_METRICS.items():
            if f"{name}@{k}" in t:
                line += f" {label}@{k} {t[f'{name}@{k}']:.4f}"
    elif "valid" in record:
        line += " | test not run (validation did not improve)"
    return line


def format_summary(summary: dict[str, Any], started_at: float | None = None) -> str:
    """Human-readable end-of-run report. `started_at`: when the command started (wall clock), for
    the time to the best epoch."""
    best, final = summary["best"], summary["final"]
    lines = [f"shardrec run: {summary['model']} on {summary['world_size']} rank(s)", "sharding plan:", format_plan(summary["plan"])]
    lines.append(f"epochs: {summary['epochs']}; final loss {final.get('loss', float('nan')):.4f}; "
                 f"last epoch {final.get('samples_per_s', 0):,.0f} samples/s")
    if best:
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
    return "\n".join(lines)
