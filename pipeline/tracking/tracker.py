"""What a run reports as metrics: the progress bar and epoch lines on the console, JSON-lines
files, Weights & Biases. (Messages about the run go through `logging`.)

Only the main rank gets a `Tracker`; every other rank gets a `NullTracker` whose methods do
nothing, so the training loop calls the tracker unconditionally and never checks its rank, and a
job opens exactly one W&B run whatever its world size. The local files (config.yaml, split.json,
metrics.jsonl, steps.jsonl, summary.json) are always written; W&B comes on top of them, and a W&B
failure is one warning line after which training goes on without it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from pipeline.atomic import write_atomic
from pipeline.config import shipped
from pipeline.config.schema import Config, TrackingConfig, load_config, show_value, to_dict, to_yaml
from pipeline.dist.group import DistContext
from pipeline.errors import ConfigError, describe
from pipeline.tracking.jsonl import append_jsonl, rewrite_jsonl
from pipeline.tracking.progress import Line
from pipeline.tracking.tensorboard import EventFiles, TensorBoardMissing
from pipeline.tracking.wandb_run import (
    WandbMissing,
    WandbRun,
    WandbUnavailable,
    agent_run,
    new_run_id,
    open_run,
    resolve_mode,
)
from pipeline.training import checkpoint

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
        text = (
            f"{step}/{self.total} [{int(fraction * 100):3d}%] loss {loss:.4f} "
            f"{images_per_s:,.0f} img/s (last {steps} step{'s' if steps != 1 else ''})"
        )
        if self.line.tty:
            width = 20
            done = int(width * fraction)
            bar = f"|{'#' * done}{'.' * (width - done)}|"
            self.line.draw(f"{self.label} {bar} {text}", force=step == self.total)
        elif fraction >= self.next_fraction and step < self.total:
            # Logs of batch jobs get a line per quarter epoch, not one per step.
            self.line.print(f"{self.label} {text}")
            self.next_fraction = math.floor(fraction * 4 + 1) / 4

    def close(self) -> None:
        self.line.end()


class StepWindow:
    """Step records between two W&B rows, averaged over the optimizer steps they cover.

    Step records arrive every train.log_every steps (and at epoch ends); a W&B row is made when
    the global step reaches or passes a multiple of tracking.log_every, from every record since
    the previous row, so no step is left out whatever the two intervals are.
    """

    def __init__(self, every: int, step: int, steps_per_epoch: int):
        self.every, self.steps_per_epoch = every, max(1, steps_per_epoch)
        self.last_step = self.logged_step = step
        self._clear()

    def _clear(self) -> None:
        self.steps, self.loss_sum, self.step_seconds_per_image = 0, 0.0, 0.0
        self.record: dict | None = None

    def add(self, record: dict) -> tuple[int, dict] | None:
        """Take one step record; return (step, row) when a multiple of `every` was reached."""
        steps = max(1, record["step"] - self.last_step)
        self.last_step = record["step"]
        self.steps += steps
        self.loss_sum += record["loss"] * steps
        # Throughput over the window is total images over total time; with a fixed batch
        # size that is steps / sum(steps_i / images_per_s_i).
        self.step_seconds_per_image += steps / max(record["images_per_s"], 1e-9)
        self.record = record
        if record["step"] // self.every > self.logged_step // self.every:
            return self.drain()
        return None

    def drain(self) -> tuple[int, dict] | None:
        """(step, row) for the records not yet turned into a row; None when there are none."""
        r = self.record
        if r is None:
            return None
        row = {
            "train/loss": self.loss_sum / self.steps,
            "train/lr": r["lr"],
            "train/images_per_s": self.steps / self.step_seconds_per_image,
            "train/epoch": r["epoch"] - 1 + r["step_in_epoch"] / self.steps_per_epoch,
        }
        self.logged_step = r["step"]
        self._clear()
        return r["step"], row


class Tracker:
    """Console, progress bar and JSON-lines files of the main rank; W&B when enabled."""

    def __init__(self, run_dir: Path, stream: TextIO = sys.stdout):
        self.run_dir, self.stream = run_dir, stream
        self.progress: Progress | None = None
        self.run_id: str | None = None
        self.wandb: WandbRun | None = None
        self.window: StepWindow | None = None
        self.tensorboard: EventFiles | None = None
        self.artifact = False

    def _print(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except BrokenPipeError:
            pass  # the reader of the console went away; the files still get everything

    def start(
        self,
        cfg: Config,
        meta: dict,
        resumed: bool,
        global_step: int,
        epochs_done: int,
        overrides: str = "",
        print_config: bool = False,
        split: dict | None = None,
    ) -> None:
        """Show the overrides line (every setting with `print_config`) and save the resolved
        config and the validation split (`split`, see `pipeline.data.split`); on resume, drop
        records past the checkpoint; start W&B if asked for."""
        config_yaml = to_yaml(cfg)
        if overrides:
            log.info(overrides)
        if print_config:
            log.info("resolved config:\n  " + config_yaml.rstrip().replace("\n", "\n  "))
        write_atomic(self.run_dir / "config.yaml", config_yaml)
        if split is not None:
            write_atomic(self.run_dir / "split.json", json.dumps(split, indent=2) + "\n")
        # On resume, the records past the checkpoint are dropped: they are trained again.
        rewrite_jsonl(
            self.run_dir / "metrics.jsonl", lambda r: resumed and r["epoch"] <= epochs_done
        )
        rewrite_jsonl(self.run_dir / "steps.jsonl", lambda r: resumed and r["step"] <= global_step)
        self._start_wandb(cfg, meta, global_step)
        if cfg.tracking.tensorboard:
            try:
                self.tensorboard = EventFiles(self.run_dir, global_step)
            except TensorBoardMissing as e:
                log.warning(f"TensorBoard logging is off: {e}; training goes on")

    def _start_wandb(self, cfg: Config, meta: dict, global_step: int) -> None:
        """Open (or, with the checkpoint's run id, continue) the job's W&B run."""
        t = cfg.tracking
        mode = resolve_mode(t.mode)
        if mode == "disabled":
            return
        self.artifact = t.artifact
        group = t.group
        agent = agent_run()
        if agent is not None:
            # A `wandb agent` started this run: the run and its id are the agent's (kept in the
            # checkpoints, so that a requeued point continues it), its group the sweep's.
            sweep, run = agent
            if self.run_id and self.run_id != run:
                log.warning(
                    f"the checkpoint belongs to W&B run {self.run_id}, but the agent started "
                    f"run {run}: logging to the agent's run"
                )
            self.run_id, group = run, group or sweep
        # Otherwise the id is chosen here, not by wandb, so that it is in the first checkpoint
        # even when W&B cannot start now and a later attempt of the job can.
        self.run_id = self.run_id or new_run_id()
        args = dict(
            run_dir=self.run_dir,
            run_id=self.run_id,
            project=t.project,
            entity=t.entity,
            name=t.name,
            group=group,
            config={**to_dict(cfg), "meta": {k: v for k, v in meta.items() if v is not None}},
        )
        try:
            self.wandb = open_run(mode, **args)
        except WandbUnavailable as e:
            if mode != "online" or isinstance(e, WandbMissing):
                log.warning(
                    f"W&B logging is off: {e}; training goes on, results stay in {self.run_dir}"
                )
                return
            # Online failed (no network, bad key, timeout): keep the metrics in an offline
            # run that `wandb sync` uploads later.
            try:
                self.wandb = open_run("offline", **args)
            except WandbUnavailable as e2:
                log.warning(
                    f"W&B logging is off: {e}, and offline too ({e2}); training goes on, "
                    f"results stay in {self.run_dir}"
                )
                return
            log.warning(f"{e}; logging offline instead: {self._sync_hint()}")
        self.window = StepWindow(t.log_every, global_step, meta["steps_per_epoch"])
        if self.wandb.mode == "online":
            log.info(f"W&B run {self.run_id}: {self.wandb.url}")
        else:
            log.info(f"W&B offline run {self.run_id}: {self._sync_hint()}")

    def _sync_hint(self) -> str:
        return f"upload it with `wandb sync {self.run_dir}/wandb/offline-run-*`"

    def _to_wandb(self, what: str, call, *args: Any, **kwargs: Any) -> None:
        """Call the W&B run; on the first failure warn once and go on without W&B."""
        if self.wandb is None:
            return
        try:
            call(*args, **kwargs)
        except Exception as e:
            self.wandb = None
            log.warning(
                f"W&B logging stopped: {what} failed ({describe(e, with_type=True)}); "
                f"training goes on, results stay in {self.run_dir}"
            )

    def start_epoch(self, epoch: int, epochs: int, steps: int, start: int = 0) -> None:
        """A progress line for `epoch`, whose first `start` steps were done before a resume."""
        self.progress = Progress(self.stream, epoch, epochs, steps, start)

    def log_step(self, record: dict) -> None:
        """Step metrics at a logging interval: progress line and steps.jsonl."""
        if self.progress is not None:
            self.progress.update(record["step_in_epoch"], record["loss"], record["images_per_s"])
        append_jsonl(self.run_dir / "steps.jsonl", record)
        if self.tensorboard is not None:
            self.tensorboard.log_step(record)
        if self.wandb is not None and self.window is not None:
            row = self.window.add(record)
            if row is not None:
                self._to_wandb("logging step metrics", self.wandb.log, row[1], step=row[0])

    def log_epoch(self, record: dict) -> None:
        """One record per epoch: the summary line and metrics.jsonl."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self._print(epoch_line(record))
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self.tensorboard is not None:
            self.tensorboard.log_epoch(record)
        if self.wandb is not None:
            skip = ("step", "test_count", "val_count", "dataset")  # the dataset: in the config
            row = {f"epoch/{k}": v for k, v in record.items() if k not in skip}
            self._to_wandb("logging epoch metrics", self.wandb.log, row, step=record["step"])

    def finish(self, summary: dict, line: str = "") -> None:
        """Write summary.json and print the run's last `line`; give W&B the summary and the
        selected checkpoint (best.pt, else the newest), then close it."""
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if line:
            self._print(line)
        if self.wandb is not None:
            self._to_wandb("writing the summary", self.wandb.summary, summary)
        if self.wandb is not None and self.artifact:
            best = self.run_dir / checkpoint.BEST
            found = [best] if best.is_file() else checkpoint.list_checkpoints(self.run_dir)
            if found:
                self._to_wandb(
                    "logging the checkpoint artifact", self.wandb.log_checkpoint, found[0], summary
                )
        self.close()

    def close(self, exit_code: int = 0) -> None:
        """Send the step records not yet in a W&B row, and finish the run.

        When training stops without calling this (a preemption, an error), wandb finishes the
        run at process exit; only the steps since the last row are then missing from W&B.
        """
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is None:
            return
        row = self.window.drain() if self.window is not None else None
        if row is not None:
            self._to_wandb("logging step metrics", self.wandb.log, row[1], step=row[0])
        self._to_wandb("finishing the run", self.wandb.finish, exit_code)
        self.wandb = None


class NullTracker(Tracker):
    """The tracker of ranks that do not report: every method of `Tracker` does nothing.

    It overrides each one by name, so a method added to `Tracker` but not here fails loudly
    (a test compares the two), and a misspelled call fails as it would on the main rank.
    """

    def __init__(self) -> None:
        self.run_id = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start_epoch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_step(self, record: dict) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        pass

    def finish(self, summary: dict, line: str = "") -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


def epoch_line(record: dict) -> str:
    """The console line of an epoch: train loss; the validation split's loss and accuracy (or
    without a split the test set's), marked where the epoch is the best so far; with
    train.test_every_epoch the test set's too; time and throughput."""
    split = "val" if "val_loss" in record else "test"
    mark = " (best so far)" if record.get("best_epoch") == record["epoch"] else ""
    parts = [
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}",
        f"{split} loss {record[f'{split}_loss']:.4f}",
        f"{split} acc {record[f'{split}_accuracy'] * 100:.2f}%{mark}",
    ]
    if "test_accuracy_this_epoch" in record:
        parts.append(f"test acc this epoch {record['test_accuracy_this_epoch'] * 100:.2f}%")
    parts += [
        f"time {record['epoch_time_s']:.1f}s",
        f"epoch average {record['images_per_s']:,.0f} img/s",
    ]
    return "  ".join(parts)


def wandb_status(t: TrackingConfig) -> str:
    """What the header says about W&B: `W&B off`, `W&B online` or `W&B offline`."""
    mode = resolve_mode(t.mode)
    return "W&B off" if mode == "disabled" else f"W&B {mode}"


def make_tracker(ctx: DistContext, run_dir: Path) -> Tracker:
    return Tracker(run_dir) if ctx.is_main else NullTracker()


def describe_overrides(path: str | None, overrides: list[str], cfg: Config) -> str:
    """The config file, where every setting is saved, and each setting that the overrides
    changed with the file's (or the default) value, for the start of a run."""
    shown = path or "built-in defaults"
    if path and not Path(path).is_file():  # a shipped config, by its name
        shown = f"{path} = {shipped.resolve(path)}"
    lines = [f"config: {shown} (every setting: {cfg.train.run_dir}/config.yaml, or --print-config)"]
    try:
        base = to_dict(load_config(path))
    except ConfigError:  # the file alone is invalid: an override fixed it
        base = None
    final, changed = to_dict(cfg), []
    for key in dict.fromkeys(item.partition("=")[0].strip() for item in overrides):
        section, _, name = key.partition(".")
        value = final[section][name]
        if base is None:
            changed.append(f"{key}={show_value(value)}")
        elif base[section][name] != value:
            was = "file" if path else "default"
            changed.append(f"{key}={show_value(value)} ({was}: {show_value(base[section][name])})")
    if changed:
        lines.append(f"overrides: {', '.join(changed)}")
    return "\n".join(lines)
