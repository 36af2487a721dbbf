"""The one logging set-up of every command.

Each module logs through `logging.getLogger(__name__)`; `setup` is called once by the command
runner (`pipeline.cli`). On the main rank INFO and above are shown (`-v`: DEBUG too, `--quiet`:
WARNING and above); on every other rank only WARNING and above, each line with its rank in
front, so that a job of many ranks prints its messages once. INFO lines go to stdout as they
are; warnings and errors go to stderr as `warning: ...` and `error: ...`.
"""

from __future__ import annotations

import logging
import sys

ROOT = "pipeline"
_seen: set[str] = set()


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
            stream.write(text + "\n")
            stream.flush()
        except BrokenPipeError:
            pass  # `command | head`: the reader is gone; nothing left to tell it
        except Exception:
            self.handleError(record)


def setup(rank: int = 0, verbosity: int = 0) -> None:
    """Show the project's log lines: `verbosity` 1 adds DEBUG, -1 leaves WARNING and above.
    Ranks other than 0 show WARNING and above, with their rank in front. Idempotent."""
    logger = logging.getLogger(ROOT)
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


def warn_once(logger: logging.Logger, message: str) -> None:
    """A warning shown the first time this process meets it."""
    if message not in _seen:
        _seen.add(message)
        logger.warning(message)
