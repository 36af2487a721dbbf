"""The training command with faults a test asks for: `python tests/faulty_train.py [FAULTS] --
[TRAIN ARGS]`, alone or under torchrun (as the script it runs).

It runs `pipeline.train.main` with the Trainer's own steps wrapped, so that the product carries
no test switch:
- `--fail-rank R --fail-step S`: rank R exits abruptly (`os._exit(17)`) after optimizer step S,
  on the job's first attempt (a torchrun restart runs clean); S = 0: at the end of the run,
  after the last checkpoint, before the ranks' final barrier.
- `--fail-agent`: the failing rank first kills the torchrun agent that started it (SIGKILL), as
  when its whole node dies.
- `--hang`: the failing rank hangs (sleeps, in no collective) instead of exiting, as a rank stuck
  on a dead disk or in a debugger does.
- `--step-sleep S`: sleep S seconds after every optimizer step (a run slow enough for a test to
  act on it while it trains).
With `--nproc-per-node N` among the training arguments, each rank runs this script too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from pipeline import train
from pipeline.dist import group, launch
from pipeline.training.trainer import Trainer


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="faulty_train.py")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-step", type=int, default=-1)
    p.add_argument("--fail-agent", action="store_true")
    p.add_argument("--hang", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0)
    return p.parse_args(argv[:split]), argv[split + 1 :]


def die(trainer: Trainer, faults: argparse.Namespace, where: str) -> None:
    rank = trainer.ctx.rank
    if faults.hang:
        sys.stderr.write(f"fault: rank {rank} hangs {where}\n")
        sys.stderr.flush()
        while True:
            time.sleep(60)
    what = "and its torchrun agent " if faults.fail_agent else ""
    sys.stderr.write(f"fault: rank {rank} {what}exits {where}\n")
    sys.stderr.flush()
    if faults.fail_agent and "TORCHELASTIC_RUN_ID" in os.environ:
        os.kill(os.getppid(), signal.SIGKILL)
    os._exit(17)


def install(faults: argparse.Namespace) -> None:
    after_step, end_of_run = Trainer.after_step, Trainer.end_of_run

    def failing(trainer: Trainer) -> bool:
        return trainer.ctx.rank == faults.fail_rank and group.restart_count() == 0

    def after_step_with_faults(self: Trainer) -> None:
        if faults.step_sleep:
            time.sleep(faults.step_sleep)
        if failing(self) and self.state.global_step == faults.fail_step:
            die(self, faults, f"at step {faults.fail_step}")
        after_step(self)

    def end_of_run_with_faults(self: Trainer) -> None:
        if failing(self) and faults.fail_step == 0:
            die(self, faults, "at the end of the run")
        end_of_run(self)

    Trainer.after_step = after_step_with_faults
    Trainer.end_of_run = end_of_run_with_faults


if __name__ == "__main__":
    faults, train_args = parse(sys.argv[1:])
    install(faults)
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    launch.WORKER = [__file__, *sys.argv[1:split], "--"]  # the ranks of --nproc-per-node too
    sys.exit(train.main(train_args))
