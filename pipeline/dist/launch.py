"""Several training processes on this machine from one command: `lenet-train --nproc-per-node N`
(what `launch/cpu.sh` and `launch/single_node.sh` run).

It is `torchrun --standalone --nproc-per-node=N -m pipeline.train ...` run inside this process,
so that the job speaks with one voice: the config is checked for the world before any worker
starts (a bad key or a batch size that does not split is one line, with no worker started), a
worker's error is the one line that worker printed (not torchrun's report after it), and
Ctrl-C is one line from rank 0 after the ranks saved their checkpoint. torchrun's own log lines
are left out unless `-v` is given.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING

from pipeline.errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

log = logging.getLogger(__name__)

WORKER = ["-m", "pipeline.train"]  # what each rank runs: torchrun's training script and options


def run_local(nproc: int, train_args: list[str], verbose: bool = False) -> int:
    """Run `python -m pipeline.train TRAIN_ARGS` as `nproc` ranks here; the job's exit code:
    0, or the exit code of the rank that caused the failure (`job_cause`)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not verbose:
        _quiet_torchrun()

    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", *WORKER, *train_args])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = job_cause(e.failures)
        if failure.exitcode < 0:  # killed by a signal, and no rank said why
            log.error(f"rank {rank} was killed by signal {-failure.exitcode}; see the lines above")
            return EXIT_UNEXPECTED
        return failure.exitcode
    except SignalException as e:
        # torchrun stopped the workers with SIGTERM: each saved a checkpoint and said so (rank 0).
        return EXIT_INTERRUPTED if e.sigval == signal.SIGINT else 128 + int(e.sigval)
    finally:
        sys.stdout.flush()
    return 0


def job_cause(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failed rank that caused the job to fail: the first rank that exited with an error of
    its own (an exit code > 0; it printed its line), else the first one killed by a signal.

    Once one rank fails, torchrun stops the others with SIGTERM and lists them as failed too,
    with timestamps in whole seconds: its own "first failure" (the earliest timestamp, the lowest
    rank on a tie) is often a rank it stopped itself, so the job's exit code would depend on
    timing."""
    return min(
        failures.items(),
        key=lambda item: (item[1].exitcode <= 0, item[1].timestamp, item[0]),
    )


def _quiet_torchrun() -> None:
    """Leave out torchrun's log lines (each elastic logger sets its own level when created)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
