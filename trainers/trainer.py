"""One rank's training, in the manner of torchtitan's trainer: build (model, sharding, optimizers),
`train_step`, `evaluate(split)`, `state_dict` / `load_state_dict`, and `fit`, whose loop calls
`train_step` for every batch of every epoch. What surrounds the step (resume within an epoch, the
ranks' agreement on a step count, preparation ahead, mid-epoch checkpoints) is the epoch iterator's
(trainers/epoch.py).

It knows nothing of Ray or torchrun: the launcher hands it a RankContext and a BatchSource.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from core.config import RunConfig
from core.dataset_format import PreparedDataset
from core.model_params import is_sequence_model
from core.rank_plan import RankPlan
from core.errors import UserError
from core.lineage import lineage, warm_start_checkpoint
from core.run_folder import (checkpoint_dir, checkpoint_world_size, complete_checkpoints, read_progress,
                             resumable_checkpoint)
from sharding.plan_io import plan_to_dict
from sharding.planner import format_plan
from trainers import checkpoint
from trainers.batches import Batch, BatchSource, check_ids, to_tensors
from trainers.distributed import RankContext, all_agree, all_sum, node_address
from trainers.epoch import EpochBatches, EpochPlan, ReadAhead
from trainers.evaluate import Evaluator
from trainers.id_counts import ManagedIdCounts, ids_line
from trainers.memory import bytes_read, local_bytes, peak_rss_mb
from trainers.report import epoch_line
from trainers.run_log import Console, RunLog, prune_metrics
from trainers.sharded_model import ShardedModel, build_sharded_model
from trainers.steps import SparseDistSteps, choose_step
from trainers.continued_epoch import ContinuedEpoch, SourceFor
from models.managed_ids import managed_table_names
from trainers.warm_start import load_grown


class NonFiniteLoss(RuntimeError):
    """A step's loss was nan or inf under trainer.nonfinite_loss = "stop"."""


class Trainer:
    """Collective where it says so: every rank builds one with the same config and calls the same
    methods in the same order."""

    def __init__(self, config: RunConfig, context: RankContext, dataset: PreparedDataset) -> None:
        # TorchRec still calls collectives that torch marks deprecated: one warning per call site and rank.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        self.config, self.context, self.dataset = config, context, dataset
        self.plan = RankPlan(context.rank, context.world_size, dataset.num_shards, config.trainer.seed)
        """What this rank reads, evaluates and seeds (the batch source is built from the same)."""
        self.sharded: ShardedModel = build_sharded_model(config, dataset, context, self.plan)  # collective
        self.evaluator = Evaluator(dataset, config.eval, self.plan,
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
        self.resume_read_mb: float | None = None
        """What this rank read while its checkpoint loaded (None: not resumed)."""
        self.saver: checkpoint.AsyncSaver | None = None
        """Background checkpoint writer (trainer.async_checkpoints), made at the first save."""
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        # Skipping a non-finite batch needs its loss before its backward: the plain step.
        requested = "plain" if config.trainer.nonfinite_loss == "skip" else config.trainer.train_pipeline
        self.step_kind = choose_step(requested, self.sharded.model, context.device)
        """"plain" or "sparse_dist" (trainers/steps.py)."""
        self._pipeline: SparseDistSteps | None = None
        self.read_ahead = ReadAhead()
        """The next epoch's batches, prepared during this epoch's last steps."""
        self.nonfinite_skipped = 0
        """Batches left out for a non-finite loss (trainer.nonfinite_loss = "skip"), this epoch."""
        self.checkpoint_due = False
        """The epoch just trained owes a checkpoint (a step checkpoint fell on its last step)."""
        self.continuing: tuple[int, int] | None = None
        """(world size, batches per rank) of a checkpoint taken inside an epoch by another world size,
        until the rest of that epoch is trained."""
        self.source_for: SourceFor | None = None

    # --- the step and the evaluation ---------------------------------------------------------------

    def train_step(self, batches: Iterator[Any] | Batch) -> tuple[Batch, torch.Tensor] | None:
        """Collective. One optimizer step: takes what it needs from `batches` (items of
        `prepare_for_step`, such as an EpochBatches; or one raw batch) and returns (the batch it
        trained, its loss detached and left on the device: reading it syncs, so the caller decides
        when), or None when `batches` is exhausted. The plain step takes one batch; TorchRec's
        train pipeline takes up to two ahead and trains them in order."""
        if isinstance(batches, dict):
            batches = iter([self.prepare_for_step(batches)])
        if self.step_kind == "sparse_dist":
            if self._pipeline is None:
                self._pipeline = SparseDistSteps(self.sharded.dmp, self.sharded.optimizer, self.context.device,
                                                 self.precision)
            done = self._pipeline.step(batches)
        else:
            item = next(batches, None)
            done = None if item is None else (item[0], self._plain_step(item[1]))
        if done is not None:
            self.step += 1
        return done

    def prepare_for_step(self, batch: Batch) -> tuple[Batch, Any]:
        """(batch, what this trainer's step consumes): its tensors on the rank's device for the plain
        step; for the pipeline, its FeatureBatch in host memory (pinned for a GPU: the pipeline copies
        it on a stream of its own). Refuses out-of-range ids. Thread-safe: the epoch's prefetch
        thread runs it."""
        check_ids(batch, self.dataset.num_users, self.dataset.num_items)
        if self.step_kind != "sparse_dist":
            return batch, to_tensors(batch, self.context.device)
        features = self.sharded.model.pipeline_input(to_tensors(batch, torch.device("cpu")))
        assert features is not None  # choose_step checked the model
        return batch, features.pin_memory() if self.context.device.type == "cuda" else features

    def precision(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast (trainer.mixed_precision); the loss comes out in fp32."""
        if self.config.trainer.mixed_precision == "bf16":
            return torch.autocast(self.context.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _plain_step(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.precision():
            loss = self.sharded.dmp(tensors)
        if self.config.trainer.nonfinite_loss == "skip" and not all_agree(bool(torch.isfinite(loss))):
            self.nonfinite_skipped += 1
            return loss.detach()  # no backward on any rank: neither the tables nor the dense layers move
        self.sharded.optimizer.zero_grad()
        loss.backward()
        self.sharded.optimizer.step()
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
        return {"epoch": self.epoch, "step": self.step, "epoch_batches": self.epoch_batches,
                "world_size": self.context.world_size, "best": self.best,
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

    def _state_to_load_into(self) -> dict[str, Any]:
        # Adam creates its moments lazily at the first step; DCP loads in place, into the tensors the
        # state dict already holds, so without them a loaded run would restart Adam from zero.
        # init_state takes a zero-gradient step that leaves the weights as they are.
        for name, optimizer in self.sharded.optimizer.optimizers:
            if name == "dense":
                optimizer.init_state()
        return self.state_dict()

    def load_checkpoint(self, path: Path) -> None:
        """Collective. Weights, optimizer state, RNG states and progress."""
        state = self._state_to_load_into()
        progress = checkpoint.load(state, path)
        self.load_state_dict(state)
        self.epoch, self.step = progress["epoch"], progress["step"]
        self.epoch_batches = int(progress.get("epoch_batches", 0))
        self.best, self.history = progress.get("best", {}), progress.get("history", [])
        written_by = checkpoint_world_size(path, progress)
        if self.epoch_batches and written_by != self.context.world_size:
            self.continuing = (written_by, self.epoch_batches)

    def warm_start(self, log: RunLog) -> None:
        """Collective. The parent run's final tables, dense layers and optimizer state, its tables
        grown to this dataset's ids; epochs, data order, RNG and best validation start afresh."""
        parent = Path(self.config.trainer.warm_start)
        path = warm_start_checkpoint(parent, verify=False)  # the command line verified it
        state = self._state_to_load_into()
        grown = load_grown(state, path, self.sharded.model.tail_rows)
        self.load_state_dict(state)
        tables = ", ".join(f"{key.split('.')[-2]} {rows[0]:,} -> {rows[1]:,}" for key, rows in grown.items()
                           if key.startswith("model."))
        log.info(f"warm-started from {parent} ({path.name})" + (f"; rows added: {tables}" if tables else ""))

    # --- the loop ----------------------------------------------------------------------------------

    def rank_resources(self) -> list[dict[str, Any]]:
        """Collective: per rank, its peak RSS, the MiB of its table shards and optimizer state, the
        CPUs it is bound to (empty: unbound), and when its first step ended (what the scale
        benchmark compares across dataset sizes)."""
        state = local_bytes(self.sharded.dmp.state_dict()) + local_bytes(self.sharded.optimizer.state_dict())
        mine = {"rank": self.context.rank, "node_ip": node_address(), "peak_rss_mb": peak_rss_mb(), "state_mb": state / 2**20,
                "peak_rss_before_checkpoint_mb": self.peak_rss_before_checkpoint_mb or peak_rss_mb(),
                "cpus": list(self.context.cpus),
                "first_step_at": self.first_step_at, "resume_read_mb": self.resume_read_mb}
        if self.context.world_size == 1:
            return [mine]
        every: list[Any] = [None] * self.context.world_size
        dist.all_gather_object(every, mine)
        return every

    def train_epoch(self, source: BatchSource, log: RunLog, run_dir: Path | None = None) -> dict[str, Any]:
        """Collective. One epoch of `source` (after the `epoch_batches` a resumed checkpoint had
        trained): `train_step` for every batch; returns the epoch's record (loss, steps, samples/s,
        data wait)."""
        self.sharded.dmp.train()
        epoch = self.epoch + 1
        trainer_config = self.config.trainer
        plan = EpochPlan(epoch, skip=self.epoch_batches, max_steps=trainer_config.max_steps_per_epoch,
                         depth=trainer_config.prefetch_batches,
                         checkpoint_every_steps=trainer_config.checkpoint_every_steps,
                         needs_count=self.step_kind == "sparse_dist")
        continued = self._continued_epoch(epoch, log)
        if continued is not None:
            # Its batches are already this world's share of what is left; a failure in it resumes
            # from the same checkpoint again (no step checkpoint of a regrouped epoch is taken).
            source = continued
            plan.skip, plan.max_steps, plan.checkpoint_every_steps = 0, 0, 0
        device = self.context.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        rows = torch.zeros((), dtype=torch.int64, device=device)
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # nan/inf steps, counted without a sync

        def checkpoint() -> None:
            self._stop_if_nonfinite(nonfinite, epoch)  # a checkpoint never holds a non-finite step's update
            self.save_checkpoint(run_dir, log)  # type: ignore[arg-type]  # handed over only with a run_dir

        self.nonfinite_skipped = 0
        started = time.perf_counter()
        with EpochBatches(source, plan, self.prepare_for_step, self.read_ahead, self.context.rank,
                          last_epoch=trainer_config.epochs, checkpoint=checkpoint if run_dir is not None else None
                          ) as batches:
            log.start_bar(f"epoch {epoch}", batches.remaining, unit="step")
            try:
                while (done := self.train_step(batches)) is not None:
                    batch, loss = done
                    self.epoch_batches += 1
                    if self.first_step_at is None:
                        self.first_step_at = time.time()
                        log.record("first_step", self.step, {"epoch": epoch})  # start-up benchmarks read its time
                    batch_rows = len(batch["user_id"])
                    finite = torch.isfinite(loss)
                    loss_sum += torch.where(finite, loss.double() * batch_rows, 0.0)
                    rows += finite * batch_rows
                    nonfinite += ~finite
                    if self.step % trainer_config.log_every == 0:
                        self._stop_if_nonfinite(nonfinite, epoch)
                        value = float(loss)
                        log.record("step", self.step, {"epoch": epoch, "loss": value})
                        log.advance(loss=value)
                    else:
                        log.advance()
                    batches.stepped(self.step, batch)
            finally:
                if self._pipeline is not None:
                    self._pipeline.end_epoch()
            batches.finish()
            steps, waited = batches.steps, batches.waited_s
            self.checkpoint_due = batches.checkpoint_at_end
        if continued is not None:
            continued.close()
        log.end_bar()
        self._stop_if_nonfinite(nonfinite, epoch)
        elapsed = time.perf_counter() - started
        total_loss, total_rows = all_sum([float(loss_sum), float(rows)])
        self.epoch, self.epoch_batches = epoch, 0
        return {"epoch": epoch, "steps": steps, "loss": total_loss / max(total_rows, 1.0),
                "nonfinite_skipped": self.nonfinite_skipped,
                "samples_per_s": total_rows / elapsed if elapsed > 0 else 0.0, "epoch_s": elapsed,
                "data_wait_frac": waited / elapsed if elapsed > 0 else 0.0}

    def _continued_epoch(self, epoch: int, log: RunLog) -> ContinuedEpoch | None:
        """The rest of an epoch another world size began (once, after such a resume), or None."""
        if self.continuing is None:
            return None
        old_world, done = self.continuing
        self.continuing = None
        if self.source_for is None:
            raise RuntimeError("this launch path cannot continue an epoch begun on another world size")
        continued = ContinuedEpoch(self.source_for, old_world, done, epoch, self.context.rank, self.context.world_size,
                                   self.dataset.num_shards, self.config.trainer.seed, self.config.trainer.batch_size,
                                   self.config.trainer.max_steps_per_epoch)
        log.info(f"epoch {epoch} was begun on {old_world} rank(s), {done} batches each: {continued.describe()}")
        return continued

    def _stop_if_nonfinite(self, nonfinite: torch.Tensor, epoch: int) -> None:
        """Collective. With trainer.nonfinite_loss = "stop", end the run when any rank's loss was
        nan or inf in this epoch so far (every rank raises alike, so none waits for another)."""
        if self.config.trainer.nonfinite_loss != "stop":
            return
        (bad,) = all_sum([float(nonfinite)])
        if bad:
            raise NonFiniteLoss(f"the loss was nan or inf {int(bad)} time(s) over the ranks in epoch {epoch} (by step "
                                f"{self.step}): the run stops before it saves such weights; lower trainer.sparse_lr "
                                "or trainer.dense_lr, or set trainer.nonfinite_loss = 'skip' to leave such "
                                "batches out")

    def _fit_epochs(self, source: BatchSource, run_dir: Path, log: RunLog) -> None:
        """The epochs left: train, evaluate and checkpoint as the config says."""
        trainer_config, k = self.config.trainer, self.config.eval.k
        id_counts = ManagedIdCounts(self.sharded.dmp) if managed_table_names(self.sharded.model) else None
        while self.epoch < trainer_config.epochs:
            record = self.train_epoch(source, log, run_dir)
            if id_counts is not None:
                record["ids"] = id_counts.epoch(self.sharded.dmp)
            last = self.epoch == trainer_config.epochs
            if self.epoch % trainer_config.eval_every == 0 or last:
                eval_started = time.perf_counter()
                record["valid"] = self.evaluate("valid", log.bar_callback("valid"), keep_ranking=True)
                # The test split is ranked only when validation improves: the reported test result is
                # the one at the best validation epoch, and the others would cost a full pass each.
                # At the same weights, it reuses what validation's ranking computed (LightGCN's layers).
                improved = not self.best or record["valid"][f"ndcg@{k}"] > self.best["valid"][f"ndcg@{k}"]
                if improved and self.config.eval.test:
                    record["test"] = self.evaluate("test", log.bar_callback("test"))
                else:
                    self.sharded.model.end_ranking()
                if improved:
                    self.best = {"epoch": self.epoch, "valid": record["valid"], "reached_at": time.time(),
                                 **({"test": record["test"]} if "test" in record else {})}
                record["eval_s"] = time.perf_counter() - eval_started
            log.record("epoch", self.step, {key: v for key, v in record.items() if not isinstance(v, dict)})
            for split in ("valid", "test"):
                if split in record:
                    log.record("eval", self.step, {f"{split}_{m}": v for m, v in record[split].items()})
            log.info(epoch_line(record, k, with_test=self.config.eval.test) + (ids_line(record["ids"]) if "ids" in record else ""))
            self.history.append(record)
            if self.epoch % trainer_config.checkpoint_every == 0 or last or self.checkpoint_due:
                self.save_checkpoint(run_dir, log)

    def _checkpoint_to_resume(self, run_dir: Path) -> tuple[Path | None, list[str]]:
        """Collective. Rank 0 picks the newest complete checkpoint whose files pass their checksums
        (reading them once for every rank) and tells the others; returns it and the lines that
        name the damaged ones it passed over."""
        chosen: list[Any] = [None]
        notes: list[str] = []
        if self.context.is_main:
            try:
                chosen = [resumable_checkpoint(run_dir, notes.append)]
            except UserError as exc:  # every checkpoint damaged (CheckpointUnusable), or unreadable
                chosen = [exc]  # every rank raises it, none is left waiting in the broadcast
        if self.context.world_size > 1:
            dist.broadcast_object_list(chosen, src=0)
        if isinstance(chosen[0], UserError):
            raise chosen[0]
        return chosen[0], notes

    def fit(self, source: BatchSource, run_dir: Path, resume: bool = False,
            console: Console | None = None, source_for: SourceFor | None = None) -> dict[str, Any]:
        """Collective. Train per the config, evaluating and checkpointing as it says; returns the run
        summary (identical on every rank; rank 0 writes it and the run folder's files, and speaks
        through `console`). `source_for` makes the source of any rank of any world size: a resume
        from a checkpoint taken inside an epoch by another world size replays those ranks' streams
        (trainers/continued_epoch.py)."""
        self.source_for = source_for
        latest, notes = self._checkpoint_to_resume(run_dir) if resume else (None, [])
        if resume and latest is None:
            raise RuntimeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        if latest is not None and self.context.is_main:
            # A run that restarts repeats the steps after its last checkpoint: their records go.
            prune_metrics(run_dir / "metrics.jsonl", read_progress(latest)["step"])
        log = RunLog(run_dir, self.context.is_main, console)
        for note in notes:
            log.info(note)
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
            before = bytes_read()
            self.load_checkpoint(latest)
            self.resume_read_mb = (bytes_read() - before) / 2**20
            log.info(f"resumed from {latest} (epoch {self.epoch}, step {self.step})")
        elif self.config.trainer.warm_start:
            self.warm_start(log)
        try:
            self._fit_epochs(source, run_dir, log)
        finally:
            self.read_ahead.take(None)  # stops a read-ahead an error left unused
        self.finish_checkpoints()
        source.close()  # a source that reads ahead stops
        summary = {
            "run_dir": str(run_dir),
            "model": self.config.model.name,
            "world_size": self.context.world_size,
            "plan": self.sharded.plan_rows,
            "epochs": self.config.trainer.epochs,
            "history": self.history,
            "best": self.best,
            "final": self.history[-1] if self.history else {},
            "parents": lineage(run_dir),
            "ranks": self.rank_resources(),
        }
        if self.context.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.close()
        return summary
