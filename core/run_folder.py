"""Where a run keeps its checkpoints, and what a resume may change (no torch: checked by the
command line before any cluster starts).

    RUN_DIR/checkpoints/epoch-0003/       at the end of epoch 3
    RUN_DIR/checkpoints/step-000000150/   inside an epoch (trainer.checkpoint_every_steps)
    each with progress.json, written last: its presence marks a complete checkpoint, and it holds
    the size and CRC-32 of every other file of the checkpoint, checked before a resume loads it
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from core.config import RunConfig
from core.errors import CheckpointUnusable, UserError

CHUNK_BYTES = 1 << 24


def checkpoint_dir(run_dir: Path, epoch: int, step: int | None = None) -> Path:
    """An epoch-end checkpoint, or (with `step`) one taken inside an epoch."""
    name = f"epoch-{epoch:04d}" if step is None else f"step-{step:09d}"
    return run_dir / "checkpoints" / name


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first. At the same step an epoch's
    checkpoint counts as newer than a step checkpoint: it was taken after the epoch's evaluation
    (run folders of earlier versions hold both)."""
    found = []
    for progress in (run_dir / "checkpoints").glob("*/progress.json"):
        try:
            found.append((int(json.loads(progress.read_text())["step"]), progress.parent))
        except (OSError, ValueError, KeyError):
            continue  # unreadable: not complete
    return sorted(found, key=lambda item: (item[0], item[1].name.startswith("epoch-"), item[1].name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps (progress.json is written last, so its presence
    means complete)."""
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def file_checksums(checkpoint: Path, rank: int = 0, world_size: int = 1) -> dict[str, list[int]]:
    """File name -> [bytes, CRC-32] for the files of a checkpoint folder (progress.json aside) that
    `rank` of `world_size` checksums (`checksum_owner`): each rank reads only what it wrote."""
    return {path.name: [path.stat().st_size, _crc32(path)] for path in sorted(checkpoint.iterdir())
            if path.is_file() and not path.name.startswith("progress.json")
            and checksum_owner(path.name, world_size) == rank}


def checksum_owner(name: str, world_size: int) -> int:
    """The rank that wrote a checkpoint file: DCP's `__<rank>_<n>.distcp`, our `rng-rank<rank>.pt`;
    rank 0 for the rest (DCP's .metadata, which its coordinator writes)."""
    digits = ""
    if name.startswith("__"):
        digits = name[2:].split("_", 1)[0]
    elif name.startswith("rng-rank") and name.endswith(".pt"):
        digits = name[len("rng-rank"):-len(".pt")]
    return int(digits) if digits.isdigit() and int(digits) < world_size else 0


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the checksums its progress.json
    records (a missing, truncated or changed file), or None. A checkpoint written before checksums
    were recorded has none to check."""
    recorded = read_progress(checkpoint).get("files")
    if recorded is None:
        return None
    for name, (size, crc) in sorted(recorded.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the checkpoint recorded {size}"
        if _crc32(path) != crc:
            return f"{path} does not match its checksum"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def checkpoint_world_size(checkpoint: Path, progress: dict[str, Any] | None = None) -> int:
    """How many ranks wrote a checkpoint: its progress.json's `world_size` (`progress`, when already
    read), or (checkpoints written before that was recorded) its rng-rank<r>.pt files, one per rank."""
    recorded = (progress if progress is not None else read_progress(checkpoint)).get("world_size")
    if recorded is not None:
        return int(recorded)
    return max(1, len(list(checkpoint.glob("rng-rank*.pt"))))


def resumable_checkpoint(run_dir: Path, say: Callable[[str], None] = print, verify: bool = True) -> Path | None:
    """The newest complete checkpoint whose files (with `verify`) pass their checksums; None: no
    complete one. Each newer one passed over is named in one line through `say`; when every one
    fails its checksums, CheckpointUnusable (exit 1) names the newest one's problem.

    Any world size continues any checkpoint: DCP reshards the tables and optimizer state, and the
    rest of an epoch begun by another world size is that world's streams replayed
    (trainers/continued_epoch.py)."""
    failures: list[tuple[Path, str]] = []
    for _, folder in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(folder) if verify else None
        if problem is None:
            for skipped, why in failures:
                say(f"checkpoint {skipped.name} is damaged ({why}); resuming from {folder.name} instead")
            return folder
        failures.append((folder, problem))
    if failures:
        raise CheckpointUnusable(f"no checkpoint of {run_dir} passes its checksums: {failures[0][1]}")
    return None


def read_progress(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "progress.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{checkpoint}: unreadable progress.json ({exc})") from None


def check_resume(config: RunConfig, run_dir: Path, verify: bool = True, world_size: int | None = None) -> None:
    """Refuse, before anything is written, a resume that cannot work: no complete checkpoint (with
    `verify`, none whose files pass their checksums), a model whose tables or layers differ from the
    checkpoint's, other [ids] settings, managed-collision tables on another `world_size` than the
    checkpoint's, or fewer epochs than already done."""
    latest = resumable_checkpoint(run_dir, lambda _: None, verify)
    if latest is None:
        raise UserError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    progress = read_progress(latest)
    saved = progress.get("config", {}).get("model")
    changed = model_changes(saved, config) if saved is not None else ""
    if changed:
        raise UserError(f"--resume {run_dir}: the checkpoint was trained with other model settings "
                        f"({changed}); they cannot change on resume")
    check_id_settings(progress, config, world_size, f"--resume {run_dir}", "resume")
    done = int(progress.get("epoch", 0))
    if config.trainer.epochs < done:
        raise UserError(f"--resume {run_dir}: {done} epochs are done already, more than --trainer.epochs "
                        f"{config.trainer.epochs}")


def check_id_settings(progress: dict[str, Any], config: RunConfig, world_size: int | None, who: str,
                      action: str) -> None:
    """A run that loads a checkpoint (`action`: resume, warm start) keeps its [ids] settings, and with
    managed-collision tables its world size: each rank's remapping state covers its own range of ids."""
    saved_ids = progress.get("config", {}).get("ids", {})
    wanted_ids = config.to_dict()["ids"]
    changed = ", ".join(f"ids.{key}" for key in sorted(wanted_ids) if key in saved_ids and saved_ids[key] != wanted_ids[key])
    if changed:
        raise UserError(f"{who}: the checkpoint was trained with other id settings ({changed}); "
                        f"they cannot change on {action}")
    saved_ranks = progress.get("world_size")
    if config.ids.managed and world_size is not None and saved_ranks not in (None, world_size):
        raise UserError(f"{who}: managed-collision tables ([ids]) {action} on the world size that "
                        f"wrote the checkpoint ({saved_ranks} ranks), not on {world_size}: each rank's id "
                        "remapping state covers its own range of ids")


def model_changes(saved: dict[str, Any], config: RunConfig) -> str:
    """The model settings (`model.KEY, ...`) in which `config` differs from a saved config's model
    section; "" when none does. A run continued from saved weights (a resume, a warm start) must
    keep them: they set the tables' widths and the layers."""
    wanted = config.to_dict()["model"]
    return ", ".join(f"model.{key}" for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key))


RUN_FOLDER_HELD_ENV = "SHARDREC_RUN_FOLDER_HELD"
"""Set by `shardrec train` for the torchrun ranks it launches: the run folder it names is held by
the driver for them (`python -m trainers` then takes no lock of its own)."""

LOCK_FILE = ".shardrec.lock"
"""In a run folder while a job writes it: who holds it (the lock itself is an flock on the file,
released by the kernel when the holder ends, however it ends)."""


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for one job: a second job on the same folder (a second --resume, or the same
    run_name) is refused with UserError naming the holder."""
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"run folder {run_dir} is in use by {holder}; wait for that job to end or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"shardrec (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    try:
        yield
    finally:
        handle.truncate(0)
        handle.close()  # closing releases the lock
