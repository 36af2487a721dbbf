"""Errors meant for people, and the exit codes every command ends with: the one description
of the codes (users read it as the table in docs/checkpoints.md#exit-codes).

Each error carries its exit code; `pipeline.cli.outcome` maps any exception to its code and
`pipeline.cli.run` ends the command with it and one line on stderr, the same for every command.
"""

from __future__ import annotations

# Exit codes, and what ends in each (the error classes below say when they are raised).
EXIT_OK = 0  # finished, or nothing left to do; also a closed pipe (`report | head`)
EXIT_UNEXPECTED = 1  # a bug: any exception not named below; its traceback is printed
EXIT_CONFIG = 2  # ConfigError; a bad command line (argparse)
EXIT_DATA = 3  # DataError
EXIT_CHECKPOINT = 4  # CheckpointError
EXIT_NONFINITE = 5  # NonFiniteLossError
EXIT_DISTRIBUTED = 6  # DistributedError; a failed collective (a lost peer, a timeout, NCCL)
EXIT_RUN_DIR = 7  # RunDirError; any OSError: an output that cannot be written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: Stopped by a signal after saving a checkpoint; run again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C; Stopped after saving, too


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
    """A config key or value that is unknown or not allowed, or that does not fit the world."""

    exit_code = EXIT_CONFIG


class DataError(PipelineError):
    """Data that is missing, cannot be downloaded, or fails its checks (size, checksum, IDX
    header), or an image `predict` cannot read."""

    exit_code = EXIT_DATA


class CheckpointError(PipelineError):
    """No usable checkpoint, a damaged one, one of another run, or a file of another format."""

    exit_code = EXIT_CHECKPOINT


class NonFiniteLossError(PipelineError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_NONFINITE


class DistributedError(PipelineError):
    """The process group cannot start, or a collective failed: a lost peer, a timeout."""

    exit_code = EXIT_DISTRIBUTED


class RankError(DistributedError):
    """A failure of this rank's own device or set-up, not a peer's and not the config's: the
    rank reports it itself, also before the process group is up (when the ranks' errors are
    otherwise alike, and rank 0 alone reports them)."""


class RunDirError(PipelineError):
    """The run directory is in use by another job, or an output cannot be written there
    (no space, no permission)."""

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
