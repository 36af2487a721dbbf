"""A two-rank job whose ranks fail in the order a test asks for, run by the launcher of
`lenet-train --nproc-per-node 2`: `python tests/rank_race.py error-first|signal-first`.

- error-first: rank 1 fails with an error of its own at once; rank 0 is busy, and torchrun
  stops it with SIGTERM. torchrun lists both, often with the same timestamp (whole seconds),
  and then names the lower rank, the stopped one, as the first failure.
- signal-first: rank 0 is killed by a signal; rank 1 takes torchrun's SIGTERM as a stop request
  and fails with its own error two seconds later, so torchrun lists the killed rank first for
  certain.

Either way the job's cause is rank 1's error: its exit code (6) and its one line.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from pipeline import cli
from pipeline.dist import launch
from pipeline.errors import RankError


def rank_body(order: str) -> int:
    rank = int(os.environ["RANK"])
    if rank == 1:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a stop request: go on
        if order == "signal-first":
            time.sleep(2.5)  # over a second after rank 0 died: a later timestamp
        raise RankError("rank 1 failed on its own")
    if order == "signal-first":
        time.sleep(1)  # rank 1 has its SIGTERM handler by now
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # torchrun stops this rank with SIGTERM once rank 1 failed
    return 0


if __name__ == "__main__":
    order = sys.argv[1]
    if "RANK" in os.environ:
        sys.exit(cli.run(lambda: rank_body(order)))
    launch.WORKER = [__file__]
    sys.exit(cli.run(lambda: launch.run_local(2, [order])))
