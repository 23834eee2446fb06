"""The per-rank training loop: shard the model, train in lockstep, evaluate, checkpoint, log.

It knows nothing of Ray or torchrun: the launcher hands it a RankContext and a BatchSource.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from cluster.dataset_format import PreparedDataset
from launcher.config import RunConfig
from models.params import is_sequence_model
from sharding.planner import format_plan
from trainers import checkpoint
from trainers.batches import BatchSource, lockstep, to_tensors
from trainers.distributed import RankContext, all_sum
from trainers.evaluate import Evaluator
from trainers.run_log import RunLog
from trainers.sharded_model import build_sharded_model


def run_training(
    config: RunConfig, context: RankContext, source: BatchSource, run_dir: Path, resume: bool = False
) -> dict[str, Any]:
    """Train per `config`; returns the run summary (identical on every rank; rank 0 writes it)."""
    # TorchRec still calls collectives that torch marks deprecated: one warning per call site and rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    dataset = PreparedDataset.open(config.data.path)
    sharded = build_sharded_model(config, dataset, context.device)
    log = RunLog(run_dir, context.is_main)
    source_of_plan = f"from {config.sharding.plan}" if config.sharding.plan else "by the TorchRec planner"
    log.info(f"sharding plan over {context.world_size} rank(s), {source_of_plan}:\n{format_plan(sharded.plan_rows)}")
    if context.is_main:
        (run_dir / "config.json").write_text(config.to_json() + "\n")
        (run_dir / "plan.json").write_text(json.dumps(sharded.plan_rows, indent=2) + "\n")

    first_epoch, step = 1, 0
    best: dict[str, Any] = {}
    if resume:
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is None:
            raise RuntimeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        progress = checkpoint.load(sharded, latest)
        first_epoch, step, best = progress["epoch"] + 1, progress["step"], progress.get("best", {})
        log.info(f"resumed from {latest} (epoch {progress['epoch']}, step {step})")

    evaluator = Evaluator(dataset, config.eval, context.rank, context.world_size, seed=config.trainer.seed,
                          sequence_model=is_sequence_model(config.model.resolved_params()))
    k = config.eval.k
    history = []
    for epoch in range(first_epoch, config.trainer.epochs + 1):
        sharded.dmp.train()
        started = time.perf_counter()
        loss_sum, rows, steps = 0.0, 0, 0
        log.start_epoch(epoch, None)
        for batch in lockstep(source.epoch(epoch), config.trainer.max_steps_per_epoch):
            loss = sharded.dmp(to_tensors(batch))
            sharded.optimizer.zero_grad()
            loss.backward()
            sharded.optimizer.step()
            value = loss.item()
            batch_rows = len(batch["user_id"])
            loss_sum += value * batch_rows
            rows += batch_rows
            steps += 1
            step += 1
            log.advance(value)
            if step % config.trainer.log_every == 0:
                log.record("step", step, {"epoch": epoch, "loss": value})
        log.end_epoch()
        elapsed = time.perf_counter() - started
        total_loss, total_rows = all_sum([loss_sum, float(rows)])
        record: dict[str, Any] = {
            "epoch": epoch,
            "steps": steps,
            "loss": total_loss / max(total_rows, 1.0),
            "samples_per_s": total_rows / elapsed if elapsed > 0 else 0.0,
            "epoch_s": elapsed,
        }
        last = epoch == config.trainer.epochs
        if epoch % config.trainer.eval_every == 0 or last:
            valid = evaluator.evaluate(sharded.model, "valid")
            test = evaluator.evaluate(sharded.model, "test")
            record["valid"], record["test"] = valid, test
            if not best or valid[f"ndcg@{k}"] > best["valid"][f"ndcg@{k}"]:
                best = {"epoch": epoch, "valid": valid, "test": test}
        log.record("epoch", step, {kk: v for kk, v in record.items() if not isinstance(v, dict)})
        if "valid" in record:
            log.record("eval", step, {f"valid_{m}": v for m, v in record["valid"].items()})
            log.record("eval", step, {f"test_{m}": v for m, v in record["test"].items()})
        log.info(_epoch_line(record, k))
        history.append(record)
        if epoch % config.trainer.checkpoint_every == 0 or last:
            path = checkpoint.checkpoint_dir(run_dir, epoch)
            checkpoint.save(sharded, path, {"epoch": epoch, "step": step, "best": best, "config": config.to_dict()})

    summary = {
        "run_dir": str(run_dir),
        "model": config.model.name,
        "world_size": context.world_size,
        "plan": sharded.plan_rows,
        "epochs": config.trainer.epochs,
        "history": history,
        "best": best,
        "final": history[-1] if history else {},
    }
    if context.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    return summary


EPOCH_LINE_METRICS = {"recall": "Recall", "ndcg": "NDCG", "hit": "Hit", "mrr": "MRR",
                      "sampled_hit": "sampled-Hit", "sampled_ndcg": "sampled-NDCG"}


def _epoch_line(record: dict[str, Any], k: int) -> str:
    line = (
        f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['steps']} steps, "
        f"{record['samples_per_s']:,.0f} samples/s"
    )
    if "valid" in record:
        v, t = record["valid"], record["test"]
        line += f" | valid NDCG@{k} {v[f'ndcg@{k}']:.4f} | test"
        for name, label in EPOCH_LINE_METRICS.items():
            if f"{name}@{k}" in t:
                line += f" {label}@{k} {t[f'{name}@{k}']:.4f}"
    return line


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run report."""
    best, final = summary["best"], summary["final"]
    lines = [f"shardrec run: {summary['model']} on {summary['world_size']} rank(s)", "sharding plan:", format_plan(summary["plan"])]
    lines.append(f"epochs: {summary['epochs']}; final loss {final.get('loss', float('nan')):.4f}; "
                 f"last epoch {final.get('samples_per_s', 0):,.0f} samples/s")
    if best:
        test = best["test"]
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in test.items() if "@" in name)
        lines.append(f"test at best validation epoch {best['epoch']} ({test['protocol']}; {test['cases']} cases): {metrics}")
    lines.append(f"run folder: {summary['run_dir']}")
    return "\n".join(lines)
