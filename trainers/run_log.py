"""What a run tells its user, and where everything else goes.

Rank 0 records metrics (metrics.jsonl, TensorBoard) and speaks to the console through `Console`
events: info lines and progress bars for each epoch and each evaluation. Under torchrun rank 0 owns
the terminal and renders them itself; under Ray they go to RUN_DIR/logs/console.jsonl and the driver
renders them (`follow_console`), so Ray's own worker logging need not reach the console at all.

Everything else a rank prints (TorchRec's planner tables, FBGEMM's load lines, Python warnings) goes
to RUN_DIR/logs/rank-<r>.log (`quiet_rank_output`), unless --verbose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

LOG_DIR = "logs"
CONSOLE_EVENTS = "console.jsonl"
TAIL_LINES = 25


def proc_stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from its third field (the state) on. The command name before it may hold
    spaces and parentheses, so the fields start after the last ')'. Raises OSError when the
    process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_start_ticks(pid: int) -> int:
    """When process `pid` started, in clock ticks since boot (field 22 of its stat): with the pid,
    what tells a process from a later one given the same pid. Raises OSError when it is gone."""
    return int(proc_stat_fields(pid)[19])


def process_started_at(pid: int | None = None) -> float | None:
    """Wall-clock time (epoch seconds) at which process `pid` (default: this one) started, from
    /proc; None where /proc is missing. The run report's "time to best" counts from the command's
    start, imports and cluster start-up included, not from this module's import."""
    try:
        ticks = process_start_ticks(pid or os.getpid())
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / LOG_DIR / f"rank-{rank}.log"


@contextlib.contextmanager
def quiet_rank_output(run_dir: Path, rank: int, verbose: bool) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ output too) to
    RUN_DIR/logs/rank-<rank>.log for the duration; yields a stream to the real console. On an
    exception the log's last lines go to the console before it propagates: errors are never hidden."""
    # Library INFO logging (TorchRec's planner tables among it) is worth keeping: in the log file, or
    # on the console with --verbose.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    if verbose:
        yield sys.stdout
        return
    path = rank_log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    errors = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    try:
        yield console
    except BaseException as exc:
        headline = failure_line(rank, exc)
        traceback.print_exc()  # into the rank's log (fd 2 still points there), so its tail shows it
        print(headline, file=sys.stderr)  # last line of the log: what a driver reports first
        sys.stdout.flush()
        sys.stderr.flush()
        errors.write(f"{headline}\n{tail(path)}(whole log: {path})\n")
        errors.flush()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        os.close(log_fd)
        console.close()
        errors.close()


FAILURE_MARK = "shardrec rank failure: "


def failure_line(rank: int, exc: BaseException) -> str:
    """One line naming the failing rank and its error (the exception's first line)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{FAILURE_MARK}rank {rank}: {type(exc).__name__}: {message}"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a text file, each indented, or "" if it is missing."""
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "".join(f"  | {line}\n" for line in text)


class Console:
    """Info lines and progress bars for a person. Events go to a terminal (`render`) or to a file a
    driver follows; bar updates are batched to a few per second."""

    def __init__(self, stream: TextIO | None = None, events_file: Path | None = None) -> None:
        self._renderer = Renderer(stream) if stream is not None else None
        self._events = events_file.open("a", buffering=1) if events_file is not None else None
        self._pending = 0
        self._postfix: str | None = None
        self._last_flush = 0.0

    def _emit(self, event: dict[str, Any]) -> None:
        if self._renderer is not None:
            self._renderer.handle(event)
        if self._events is not None:
            self._events.write(json.dumps(event) + "\n")

    def info(self, message: str) -> None:
        self._flush_bar()
        self._emit({"info": f"[shardrec {time.strftime('%H:%M:%S')}] {message}"})

    def start_bar(self, description: str, total: int | None, unit: str) -> None:
        self._emit({"bar": description, "total": total, "unit": unit})

    def advance(self, count: int = 1, postfix: str | None = None) -> None:
        self._pending += count
        self._postfix = postfix or self._postfix
        if time.monotonic() - self._last_flush > 0.25:
            self._flush_bar()

    def _flush_bar(self) -> None:
        if self._pending:
            self._emit({"advance": self._pending, "postfix": self._postfix})
            self._pending, self._last_flush = 0, time.monotonic()

    def end_bar(self) -> None:
        self._flush_bar()
        self._emit({"end_bar": True})
        self._postfix = None

    def close(self) -> None:
        self._flush_bar()
        self._emit({"done": True})
        if self._events is not None:
            self._events.close()


class Renderer:
    """Turns console events into text: a tqdm bar on a terminal, nothing but the lines elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self._bar: Any = None

    def handle(self, event: dict[str, Any]) -> None:
        if "info" in event:
            if self._bar is not None:
                self._bar.write(event["info"], file=self.stream)
            else:
                self.stream.write(event["info"] + "\n")
                self.stream.flush()
        elif "bar" in event and self.interactive:
            from tqdm import tqdm  # imported where used: only a terminal needs it

            self._bar = tqdm(total=event["total"], desc=event["bar"], unit=event["unit"], leave=False,
                             file=self.stream)
        elif "advance" in event and self._bar is not None:
            self._bar.update(event["advance"])
            if event.get("postfix"):
                self._bar.set_postfix_str(event["postfix"])
        elif ("end_bar" in event or "done" in event) and self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def follow_console(run_dir: Path, stream: TextIO = sys.stdout, poll_s: float = 0.2) -> Iterator[None]:
    """Driver side: render rank 0's console events (RUN_DIR/logs/console.jsonl) while the body runs,
    starting from the file's current end (a resumed run appends)."""
    path = run_dir / LOG_DIR / CONSOLE_EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    start = path.stat().st_size
    stop = threading.Event()
    renderer = Renderer(stream)

    def follow() -> None:
        with path.open() as handle:
            handle.seek(start)
            buffer = ""
            while True:
                chunk = handle.read()
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    if line.strip():
                        renderer.handle(json.loads(line))
                if not chunk:
                    if stop.is_set():
                        return
                    time.sleep(poll_s)

    thread = threading.Thread(target=follow, name="shardrec-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        renderer.handle({"done": True})


class RunLog:
    """Rank 0's record of a run: JSONL metrics, TensorBoard scalars and the console. Other ranks
    get a RunLog that does nothing, so the loop needs no `if rank == 0`."""

    def __init__(self, run_dir: Path, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console if enabled else None
        self._tensorboard: Any = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (run_dir / "metrics.jsonl").open("a")
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be absent

                self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.info("tensorboard is not installed: TensorBoard scalars are off (metrics.jsonl has them all)")

    def info(self, message: str) -> None:
        if self.console is not None:
            self.console.info(message)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def start_bar(self, description: str, total: int | None, unit: str = "step") -> None:
        if self.console is not None:
            self.console.start_bar(description, total, unit)

    def advance(self, loss: float | None = None) -> None:
        if self.console is not None:
            self.console.advance(1, None if loss is None else f"loss={loss:.4f}")

    def end_bar(self) -> None:
        if self.console is not None:
            self.console.end_bar()

    def bar_callback(self, split: str) -> Callable[[int], None] | None:
        """A callback for Evaluator.evaluate: opens a bar on the first call (told the batch count),
        advances it after, and closes it on the last batch."""
        if self.console is None:
            return None
        state = {"total": None, "done": 0}

        def on_batch(total: int) -> None:
            if state["total"] is None:
                state["total"] = total
                if total:
                    self.start_bar(f"evaluate {split}", total, unit="batch")
                return
            state["done"] += 1
            self.advance()
            if state["done"] >= total:
                self.end_bar()

        return on_batch

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
            if self.console is not None:
                self.console.close()


def prune_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics.jsonl records up to `last_step` (atomically: a crash keeps the old file)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    staging.replace(path)
