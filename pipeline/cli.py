"""What every command shares: its parser's common options, the logging set-up, and the one
mapping from an exception to its line and exit code (`outcome`; the codes, and what ends in
each, are described in `pipeline.errors`), so train, evaluate, export, predict, report and
bench end alike.

`run(body)` calls the command's body and says what escapes it, as `outcome` classifies it:
- an error meant for people (`PipelineError`; an `OSError` becomes one): `error: ...`. Before
  the process group starts (config, command line, environment) every rank meets the same
  error, so only rank 0 prints it; once the group is up, the rank that raised it prints it (a
  peer that learns of the failure through a collective raises `PeerFailed`, which ends
  quietly with the same code). Under torchrun the message also goes into the worker's error
  file, so that torchrun names it as the root cause whichever rank exited first;
- a failed collective (a lost peer, a timeout): a line from each rank that met it;
- Ctrl-C: one line from rank 0; a closed pipe (`report | head`): nothing;
- anything else is a bug: its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path

from pipeline import __version__
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_DIR,
    EXIT_UNEXPECTED,
    PeerFailed,
    PipelineError,
    RankError,
    RunDirError,
    Stopped,
    describe,
)
from pipeline.tracking import progress

log = logging.getLogger(__name__)

# What the running command writes, for the line an OSError ends it with: what to name when the
# error names no file, and what to do (see `writing`).
_ANY_FILE = ("a file", "free space or choose a writable directory, and run again")
_writes: ContextVar[tuple[str, str]] = ContextVar("writes", default=_ANY_FILE)


# -- logging: each module logs through `logging.getLogger(__name__)`; `run` sets it up once. On
# the main rank INFO and above are shown (`-v`: DEBUG too, `--quiet`: WARNING and above); on every
# other rank only WARNING and above, each line with its rank in front, so that a job of many ranks
# prints its messages once. INFO lines go to stdout as they are; warnings and errors go to stderr
# as `warning: ...` and `error: ...`; each on a line of its own, below a progress line.


class _Handler(logging.Handler):
    """Writes to the sys.stdout / sys.stderr of the moment (pytest and redirections swap them)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                text, stream = f"{self.prefix}error: {message}", sys.stderr
            elif record.levelno >= logging.WARNING:
                text, stream = f"{self.prefix}warning: {message}", sys.stderr
            else:
                text, stream = f"{self.prefix}{message}", sys.stdout
            progress.end_line()
            stream.write(text + "\n")
            stream.flush()
        except BrokenPipeError:
            pass  # `command | head`: the reader is gone; nothing left to tell it
        except Exception:
            self.handleError(record)


def setup_logging(rank: int = 0, verbosity: int = 0) -> None:
    """Show the project's log lines: `verbosity` 1 adds DEBUG, -1 leaves WARNING and above.
    Ranks other than 0 show WARNING and above, with their rank in front. Idempotent."""
    logger = logging.getLogger("pipeline")
    for handler in list(logger.handlers):
        if isinstance(handler, _Handler):
            logger.removeHandler(handler)
    if rank == 0:
        level = {1: logging.DEBUG, -1: logging.WARNING}.get(verbosity, logging.INFO)
        logger.addHandler(_Handler(""))
    else:
        level = logging.DEBUG if verbosity > 0 else logging.WARNING
        logger.addHandler(_Handler(f"[rank {rank}] "))
    logger.setLevel(level)
    # Records still reach the root logger's handlers, if a program embedding the pipeline (or
    # pytest) set any; a command has none, and lines are printed once, by the handler above.


def prog(module: str) -> str:
    """The program's name as it was called: `lenet-train`, or `python -m pipeline.train`."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not called or called.endswith(".py") or called == "-c":
        return f"python -m {module}"
    return called


def parser(module: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An argument parser with the options every command has: --version, -v, -q."""
    p = argparse.ArgumentParser(prog=prog(module), description=description, **kwargs)
    p.add_argument("--version", action="version", version=f"%(prog)s (lenet-ddp) {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="also print debug messages")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only warnings, errors and results"
    )
    return p


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a trained model (`target`, `--last`), as
    `pipeline.trained.loading.find_checkpoint` reads them: evaluate, export and predict take
    the same."""
    parser.add_argument(
        "target",
        type=Path,
        help="a run directory (its best.pt: the checkpoint of the epoch training selected; "
        "else its newest valid checkpoint) or a checkpoint file",
    )
    parser.add_argument(
        "--last",
        action="store_true",
        help="with a run directory: its newest checkpoint, not best.pt",
    )


def verbosity(args: argparse.Namespace) -> int:
    return 1 if args.verbose else -1 if args.quiet else 0


def env_rank() -> int:
    """This process's rank as its launcher set it (0 without one)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _group_started() -> bool:
    try:
        import torch.distributed as torch_dist
    except ImportError:
        return False
    return torch_dist.is_available() and torch_dist.is_initialized()


def _record_for_torchrun(e: BaseException, with_traceback: bool = False) -> None:
    """Write the error into torchrun's error file for this worker, if it gave one, so that its
    failure report names the error (it shows the first rank that exited): the one line of an
    error meant for people, the traceback of any other."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    text = traceback.format_exc() if with_traceback else f"error: {e}"
    record = {
        "message": {
            "message": f"{type(e).__name__}: {e}",
            "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))},
        }
    }
    try:
        with open(path, "w") as f:  # the format of torch's ErrorHandler.record_exception
            json.dump(record, f)
    except OSError:
        pass  # the report is torchrun's; ours is already on stderr


def report(e: PipelineError) -> None:
    """One `error:` line for `e`, from the rank that should say it (see the module's text)."""
    _record_for_torchrun(e)
    if _group_started() or env_rank() == 0 or isinstance(e, RankError):
        log.error(str(e))


def writing(where: str, hint: str) -> None:
    """Name what the running command writes (`where`, for an OSError that names no file) and
    what to do when it cannot (`hint`): the line `outcome` gives an OSError, until `run` ends."""
    _writes.set((where, hint))


def outcome(e: BaseException) -> tuple[int, PipelineError | None]:
    """The exit code `e` ends a command with, and the error whose line says why: None where
    the run or a peer rank says it, for Ctrl-C and a closed pipe (see `run`), and for a bug."""
    if isinstance(e, (Stopped, PeerFailed)):  # the run said why, or the failed rank says it
        return e.exit_code, None
    if isinstance(e, PipelineError):
        return e.exit_code, e
    if isinstance(e, BrokenPipeError):
        return EXIT_OK, None
    if isinstance(e, OSError):  # a file that cannot be written: no space, no permission
        where, hint = _writes.get()
        why = e.strerror or describe(e)
        return EXIT_RUN_DIR, RunDirError(f"cannot write {e.filename or where}: {why}; {hint}")
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, None
    from pipeline.dist import group

    failed = group.collective_failure(e) if isinstance(e, RuntimeError) else None
    return (EXIT_UNEXPECTED, None) if failed is None else (failed.exit_code, failed)


def run(body: Callable[[], int], *, verbose: int = 0, interrupted: str = "interrupted") -> int:
    """Run a command's `body` and return its exit code (`outcome`); see the module's text."""
    rank = env_rank()
    setup_logging(rank, verbose)
    token = _writes.set(_ANY_FILE)
    threads_hook, threading.excepthook = threading.excepthook, _thread_failed
    try:
        return body()
    except (Exception, KeyboardInterrupt) as e:
        code, err = outcome(e)
        if isinstance(e, KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # no traceback for another one
            if rank == 0:
                progress.end_line()
                print(str(e) or interrupted, file=sys.stderr, flush=True)
        elif isinstance(e, BrokenPipeError):
            _quiet_stdout()
        elif err is not None and isinstance(e, RuntimeError):  # a failed collective
            _record_for_torchrun(err)
            log.error(f"(rank {rank}) {err}")
        elif err is not None:
            report(err)
        elif not isinstance(e, (Stopped, PeerFailed)):
            _record_for_torchrun(e, with_traceback=True)
            traceback.print_exc()
        return code
    finally:
        _writes.reset(token)
        threading.excepthook = threads_hook


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A library's background thread that failed (TensorBoard's event writer, when the run
    directory goes away): one warning line instead of its traceback; what it means for the run
    is the error the run itself then meets."""
    name = args.thread.name if args.thread else "a thread"
    log.warning(f"a background thread ({name}) stopped: {describe(args.exc_value)}")


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so that the interpreter's own flush at
    exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
