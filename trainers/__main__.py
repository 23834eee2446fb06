"""torchrun entry: `torchrun --nproc-per-node 2 -m trainers --config launcher/configs/ncf_ml100k.toml [...]`.

Accepts the same arguments as `shardrec train` (config, dotted overrides, --resume); no Ray involved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

from core.config import refuse_stream_only_settings
from core.dataset_format import PreparedDataset
from core.errors import UserError
from core.lineage import check_warm_start
from core.run_folder import RUN_FOLDER_HELD_ENV, check_resume, run_folder_lock
from core.run_args import parse_train_args, report_user_error, resolve_run_dir
from trainers.distributed import setup, teardown
from trainers.entry import torchrun_rank
from trainers.preflight import check_job
from trainers.run_log import process_started_at
from trainers.report import format_summary


def main(argv: list[str]) -> int:
    try:
        config, resume_dir, verbose = parse_train_args(argv)
        refuse_stream_only_settings(config, "plain torchrun")
        dataset = PreparedDataset.open(config.data.path)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if resume_dir is not None:
            # Every rank runs this: the checksums are read once, by rank 0 when it loads (Trainer.fit).
            check_resume(config, resume_dir, verify=False, world_size=world_size)
        elif config.trainer.warm_start:
            check_warm_start(config, verify=os.environ.get("RANK", "0") == "0", world_size=world_size)  # one rank reads the checksums
        check_job(config, dataset, world_size,
                  ranks_on_this_machine=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except UserError as exc:
        return report_user_error(exc)
    context = setup(config.cluster.backend, bind_cpus=config.cluster.bind_cpus)
    held = contextlib.ExitStack()
    try:
        # Every rank must use rank 0's run folder name (it may contain a timestamp), and must learn of
        # rank 0's refusal too, or it would wait for the folder name forever.
        chosen: list[object] = [None]
        if context.is_main:
            try:
                chosen = [resolve_run_dir(config, resume_dir)]
                if os.environ.get(RUN_FOLDER_HELD_ENV) != str(chosen[0]):  # not held by a driver for us
                    held.enter_context(run_folder_lock(Path(chosen[0])))  # rank 0 holds it for the job
            except UserError as exc:
                chosen = [exc]
        dist.broadcast_object_list(chosen, src=0)
        if isinstance(chosen[0], UserError):
            raise chosen[0]
        run_dir = Path(chosen[0])  # type: ignore[arg-type]
        summary = torchrun_rank(config, run_dir, resume_dir is not None, context, verbose)
        if context.is_main:
            # The command is the launcher (torchrun) that started this rank.
            print(format_summary(summary, process_started_at(os.getppid())), flush=True)
    except UserError as exc:
        return report_user_error(exc)
    finally:
        held.close()
        teardown(context)
    return 0


def _exit_now(code: int) -> None:
    """Leave without running C++ static destructors. About one torchrun run in seven on the 2-core
    machine aborted after a complete run ("terminate called without an active exception", SIGABRT
    while the interpreter shut down, after summary.json and the checkpoints were written and the
    process group destroyed), which turned a finished job into a failed one. By then everything
    the run owes is on disk: flush what is buffered and end the process directly."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main(sys.argv[1:]))
