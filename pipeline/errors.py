"""Errors meant for people, and the exit codes the pipeline ends with.

Each error carries the process exit code it maps to, so that `pipeline.cli.run` turns any of
them into one line on stderr and a documented, non-zero exit status, the same for every command.
"""

from __future__ import annotations

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_DISTRIBUTED = 6
EXIT_RUN_DIR = 7  # the run directory is in use, or an output cannot be written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again to resume.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def describe(e: BaseException, with_type: bool = False, limit: int = 200) -> str:
    """The first line of an exception (its type's name where it has no text), for one-line
    messages; `with_type` puts the type's name in front."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if with_type or not text:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PipelineError(Exception):
    """An error whose message is one line that says what went wrong and what to do."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(PipelineError):
    exit_code = EXIT_CONFIG


class DataError(PipelineError):
    exit_code = EXIT_DATA


class CheckpointError(PipelineError):
    exit_code = EXIT_CHECKPOINT


class NonFiniteLossError(PipelineError):
    exit_code = EXIT_NONFINITE


class DistributedError(PipelineError):
    exit_code = EXIT_DISTRIBUTED


class RankError(DistributedError):
    """A failure of this rank's own device or set-up, not a peer's and not the config's: the
    rank reports it itself, also before the process group is up (when the ranks' errors are
    otherwise alike, and rank 0 alone reports them)."""


class RunDirError(PipelineError):
    exit_code = EXIT_RUN_DIR


class PeerFailed(PipelineError):
    """A peer rank failed and reports it; this rank ends quietly with the same exit code."""

    def __init__(self, exit_code: int):
        super().__init__(f"a peer rank failed (exit code {exit_code})")
        self.exit_code = exit_code


class Stopped(Exception):
    """Raised once a stop signal's checkpoint is written: ends the run with EXIT_PREEMPTED
    (SIGTERM, train.preempt_signal) or EXIT_INTERRUPTED (Ctrl-C). The run already said so."""

    def __init__(self, exit_code: int = EXIT_PREEMPTED):
        super().__init__(f"stopped after saving a checkpoint (exit code {exit_code})")
        self.exit_code = exit_code
