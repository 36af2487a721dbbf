"""Errors meant for people, and the exit codes every command ends with: the one description
of the codes (users read it as the table in docs/checkpoints.md#exit-codes).

Each error carries its exit code; `pipeline.cli.outcome` maps any exception to its code and
`pipeline.cli.run` ends the command with it and one line on stderr, the same for every command.
"""

from __future__ import annotations

# Exit codes, and what ends in each.
EXIT_OK = 0  # finished, or nothing left to do; also a closed pipe (`report | head`)
EXIT_UNEXPECTED = 1  # a bug: any exception not named below; its traceback is printed
EXIT_CONFIG = 2  # ConfigError; a bad command line (argparse)
EXIT_DATA = 3  # DataError: bad or missing data
EXIT_CHECKPOINT = 4  # CheckpointError: none usable, damaged, incompatible, or of another format
EXIT_NONFINITE = 5  # NonFiniteLossError
EXIT_DISTRIBUTED = 6  # DistributedError; a failed collective (a lost peer, a timeout, NCCL)
EXIT_RUN_DIR = 7  # RunDirError: the run directory is in use; any OSError: an output unwritable
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
