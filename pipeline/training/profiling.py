"""`train.profile=A:B`: torch.profiler over the optimizer steps A+1 to B, on the ranks of
`train.profile_ranks` (rank 0 by default).

Step A is the profiler's warm-up (its first step carries the profiler's own start-up), steps
A+1..B are recorded. The trace goes to `RUN_DIR/profile/` as `rank<R>.<time>.pt.trace.json`
(Chrome's trace format: it opens in https://ui.perfetto.dev, chrome://tracing and TensorBoard's
profiler plugin, `tensorboard --logdir RUN_DIR/profile`), with the table of the operators that
took the most time of their own (self CPU time, and self CUDA time on GPU) beside it in
`rank<R>-top.txt`; rank 0 prints that table. Off (the default), nothing is created and the step
pays one attribute test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.atomic import write_atomic
from pipeline.config.schema import Config, step_range

log = logging.getLogger(__name__)
ROWS = 15  # of the top-operator table


def profiled_rank(setting: str, rank: int) -> bool:
    if setting.strip() == "all":
        return True
    return str(rank) in {r.strip() for r in setting.split(",")}


class StepProfiler:
    """torch.profiler across the steps A+1..B of one rank; `after_step` after every step."""

    def __init__(self, first: int, last: int, out_dir: Path, rank: int, cuda: bool):
        self.first, self.last, self.dir, self.rank = first, last, out_dir, rank
        warmup = 1 if first >= 1 else 0
        self.begin_after = first - warmup  # the profiler starts once this step is done
        activities = [torch.profiler.ProfilerActivity.CPU]
        activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
        self.sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_trace = torch.profiler.tensorboard_trace_handler(
            str(self.dir), worker_name=f"rank{rank}"
        )
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=last - first, repeat=1),
            on_trace_ready=self._ready,
        )
        self.running = self.done = False
        self.table = ""

    def _ready(self, prof: torch.profiler.profile) -> None:
        """The recorded steps are complete: save the trace, and the table of operators."""
        self.save_trace(prof)
        self.table = prof.key_averages().table(sort_by=self.sort, row_limit=ROWS)

    def at_start(self, step: int) -> None:
        """The run starts (or resumes) after `step`."""
        if step == self.begin_after:
            self.prof.start()
            self.running = True

    def after_step(self, step: int) -> None:
        if self.done:
            return
        if not self.running:
            self.at_start(step)
            return
        self.prof.step()
        if step >= self.last:
            self.finish()

    def finish(self) -> None:
        """Stop (at step B, or when the run ends first), write the table, and say where."""
        if not self.running or self.done:
            return
        self.prof.stop()
        self.running, self.done = False, True
        if not self.table:  # the run ended before step B: what was recorded so far
            self._ready(self.prof)
        top = write_atomic(self.dir / f"rank{self.rank}-top.txt", self.table + "\n")
        log.info(
            f"profile of steps {self.first + 1}-{self.last}: trace in {self.dir}, the operators "
            f"by self time in {top}:\n{self.table}"
        )


def make(cfg: Config, rank: int, run_dir: Path, device: torch.device, step: int):
    """The run's profiler (None: train.profile is off, or for this rank, or already past)."""
    found = step_range(cfg.train.profile)
    if found is None or not profiled_rank(cfg.train.profile_ranks, rank) or step >= found[1]:
        return None
    if step > found[0]:
        log.warning(
            f"train.profile={cfg.train.profile}: the run resumes after step {step}, inside that "
            "range, so it is not profiled; give a range after the resume's step"
        )
        return None
    profiler = StepProfiler(*found, run_dir / "profile", rank, device.type == "cuda")
    profiler.at_start(step)
    return profiler
