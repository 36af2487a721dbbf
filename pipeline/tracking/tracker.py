"""What a run reports as metrics, through a list of sinks (`pipeline.tracking.sink`): the
console and the run directory's files (here), Weights & Biases, TensorBoard. (Messages about
the run go through `logging`.)

Only the main rank's tracker has sinks; every other rank's list is empty, so the training loop
calls the tracker unconditionally and never checks its rank, and a job opens exactly one W&B
run whatever its world size. The local files (config.yaml, split.json, metrics.jsonl,
steps.jsonl, summary.json) are always written; W&B (where it has credentials or is asked for)
and TensorBoard (where it is installed) come on top of them, and a failure of either is one
warning line after which training goes on without it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from pipeline.atomic import write_atomic
from pipeline.config.schema import Config, TrackingConfig, to_yaml
from pipeline.dist.group import DistContext
from pipeline.results.records import percent
from pipeline.tracking.jsonl import append_jsonl, rewrite_jsonl
from pipeline.tracking.progress import BAR, Line
from pipeline.tracking.sink import RunStart, Sink
from pipeline.tracking.tensorboard import TensorBoardSink, enabled
from pipeline.tracking.wandb_run import WandbSink, resolve_mode

log = logging.getLogger(__name__)


class Progress:
    """A per-epoch progress line: redrawn in place on a terminal, a few plain lines otherwise.

    Its loss and img/s are those of the steps since the previous update (train.log_every steps,
    fewer at the end of an epoch), not averages over the epoch.
    """

    def __init__(self, stream: TextIO, epoch: int, epochs: int, total: int, start: int = 0):
        self.line, self.total = Line(stream), total
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.next_fraction = 0.25
        self.last_step = start

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        fraction = step / self.total
        steps, self.last_step = step - self.last_step, step
        fields = [  # the most important first: a narrow terminal shows the first ones
            self.label,
            f"{step}/{self.total} [{int(fraction * 100):3d}%]",
            f"loss {loss:.4f}",
            f"{images_per_s:,.0f} img/s",
            BAR,
            f"(last {steps} step{'s' if steps != 1 else ''})",
        ]
        if self.line.tty:
            self.line.draw(fields, fraction, force=step == self.total)
        elif fraction >= self.next_fraction and step < self.total:
            # Logs of batch jobs get a line per quarter epoch, not one per step.
            self.line.print(" ".join(f for f in fields if f != BAR))
            self.next_fraction = math.floor(fraction * 4 + 1) / 4

    def close(self) -> None:
        self.line.end()


class Console(Sink):
    """The console (overrides line, progress line, epoch lines, last line) and the run
    directory's files: config.yaml, split.json, steps.jsonl, metrics.jsonl, summary.json."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None):
        # By default the sys.stdout of the moment, where the log lines go (redirections swap it).
        self.run_dir, self.stream = run_dir, stream or sys.stdout
        self.out = Line(self.stream)  # whole lines; a reader that went away ends them quietly
        self.progress: Progress | None = None

    def start(self, run: RunStart) -> None:
        """Show the overrides line (every setting with `print_config`) and save the resolved
        config and the validation split (see `pipeline.data.split`); on resume, drop the
        records past the checkpoint: they are trained again."""
        config_yaml = to_yaml(run.cfg)
        if run.overrides:
            log.info(run.overrides)
        if run.print_config:
            log.info("resolved config:\n  " + config_yaml.rstrip().replace("\n", "\n  "))
        write_atomic(self.run_dir / "config.yaml", config_yaml)
        if run.split is not None:
            write_atomic(self.run_dir / "split.json", json.dumps(run.split, indent=2) + "\n")
        rewrite_jsonl(
            self.run_dir / "metrics.jsonl", lambda r: run.resumed and r["epoch"] <= run.epochs_done
        )
        rewrite_jsonl(
            self.run_dir / "steps.jsonl", lambda r: run.resumed and r["step"] <= run.global_step
        )

    def start_epoch(self, epoch: int, epochs: int, steps: int, start: int) -> None:
        self.progress = Progress(self.stream, epoch, epochs, steps, start)

    def log_step(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.update(record["step_in_epoch"], record["loss"], record["images_per_s"])
        append_jsonl(self.run_dir / "steps.jsonl", record)

    def log_epoch(self, record: dict) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.out.print(epoch_line(record))
        append_jsonl(self.run_dir / "metrics.jsonl", record)

    def finish(self, summary: dict, line: str) -> None:
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if line:
            self.out.print(line)


class Tracker:
    """Hands what the trainer reports to each of its sinks, in order; with none, does nothing.

    `run_id` is the job's W&B run id: the trainer sets it from the checkpoint before `start`,
    and keeps what it is after `start` in the checkpoints it writes.
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.run_id: str | None = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        """The run starts, or resumes: the arguments are `RunStart`'s fields, but the run id,
        which is the tracker's."""
        run = RunStart(*args, **kwargs, run_id=self.run_id)
        for sink in self.sinks:
            sink.start(run)
        self.run_id = next((s.run_id for s in self.sinks if s.run_id), self.run_id)

    def start_epoch(self, epoch: int, epochs: int, steps: int, start: int = 0) -> None:
        """A progress line for `epoch`, whose first `start` steps were done before a resume."""
        for sink in self.sinks:
            sink.start_epoch(epoch, epochs, steps, start)

    def log_step(self, record: dict) -> None:
        """Step metrics (see `Sink.log_step`): steps.jsonl, the progress line, W&B, ..."""
        for sink in self.sinks:
            sink.log_step(record)

    def log_epoch(self, record: dict) -> None:
        """One record per epoch: the summary line, metrics.jsonl, ..."""
        for sink in self.sinks:
            sink.log_epoch(record)

    def finish(self, summary: dict, line: str = "") -> None:
        """Write summary.json and print the run's last `line`; give W&B the summary (and the
        selected checkpoint as an artifact, with tracking.artifact), then close every sink."""
        for sink in self.sinks:
            sink.finish(summary, line)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink, W&B told the run's `exit_code`. When training stops without
        calling this (a preemption, an error), wandb finishes the run at process exit."""
        for sink in self.sinks:
            sink.close(exit_code)


def make_tracker(ctx: DistContext, cfg: Config) -> Tracker:
    """The tracker of this rank: on the main rank the console and files, W&B unless its mode
    resolves to disabled, and TensorBoard where tracking.tensorboard enables it; elsewhere no
    sinks."""
    if not ctx.is_main:
        return Tracker([])
    run_dir, mode = Path(cfg.train.run_dir), resolve_mode(cfg.tracking.mode)
    sinks: list[Sink] = [Console(run_dir)]
    if mode != "disabled":
        sinks.append(WandbSink(run_dir, cfg.tracking, mode))
    if enabled(cfg.tracking.tensorboard):
        sinks.append(TensorBoardSink(run_dir))
    return Tracker(sinks)


def epoch_line(record: dict) -> str:
    """The console line of an epoch: train loss; the validation split's loss and accuracy (or
    without a split the test set's), marked where the epoch is the best so far; with
    train.test_every_epoch the test set's too; time and throughput."""
    split = "val" if "val_loss" in record else "test"
    mark = " (best so far)" if record.get("best_epoch") == record["epoch"] else ""
    parts = [
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}",
        f"{split} loss {record[f'{split}_loss']:.4f}",
        f"{split} acc {percent(record[f'{split}_accuracy'])}{mark}",
    ]
    if "test_accuracy_this_epoch" in record:
        parts.append(f"test acc this epoch {percent(record['test_accuracy_this_epoch'])}")
    parts += [
        f"time {record['epoch_time_s']:.1f}s",
        f"epoch average {record['images_per_s']:,.0f} img/s",
    ]
    return "  ".join(parts)


def tracking_status(t: TrackingConfig) -> str:
    """What the header says about tracking: W&B's mode (`W&B off`, `W&B online` or
    `W&B offline`), then `TensorBoard on` or `TensorBoard off`."""
    mode = resolve_mode(t.mode)
    wandb = "W&B off" if mode == "disabled" else f"W&B {mode}"
    return f"{wandb} | TensorBoard {'on' if enabled(t.tensorboard) else 'off'}"
