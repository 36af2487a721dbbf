"""The training run: build its parts, resume, train epochs, evaluate, save, report.

A `Trainer` wires the parts of a run: the device-resident data of this rank, the `Engine`
(model, optimizer, schedule, scaler), the `TrainState` (where the run is) and the tracker. The
engine and the state each give `state_dict()` / `load_state_dict()`; a checkpoint is what
`Trainer.state_dict()` gathers from them, with the RNG states and the facts a resume checks.

The loop is small named steps: `train_epoch` runs `step` and then `after_step`, the cadence of
the run (report every train.log_every steps, save by steps and by the clock, the ranks' stop
vote), each in a method of its own; the epoch's train time has one owner, `EpochClock`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import __version__, checkpoint, dist, run_lock
from pipeline.config import Config, to_dict
from pipeline.cpu_memory import reuse_freed_memory
from pipeline.data.device import TrainBatches, eval_indices, load_splits, steps_per_epoch, to_device
from pipeline.engine import Engine
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    ConfigError,
    NonFiniteLossError,
    Stopped,
)
from pipeline.model import LeNet
from pipeline.profiling import make as make_profiler
from pipeline.stop_signals import StopRequest
from pipeline.tracking import make_tracker, wandb_status

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is. The epoch totals are global over ranks, and carried in checkpoints so
    that an epoch interrupted and resumed reports the same numbers as one that was not."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_micro_steps: int = 0
    epoch_time: float = 0.0  # train seconds of the current epoch so far
    best_accuracy: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_micro_steps, self.epoch_time = 0.0, 0, 0.0


class EpochClock:
    """The train time of the current epoch, kept in `state.epoch_time`: it runs while steps
    run, and is paused around what is not training (saving, evaluating), so that a checkpoint
    holds the epoch's train time so far and a resumed epoch reports the whole epoch's speed."""

    def __init__(self, state: TrainState):
        self.state = state
        self.since: float | None = None

    def start(self) -> None:
        self.since = time.perf_counter()

    def pause(self) -> None:
        if self.since is not None:
            self.state.epoch_time += time.perf_counter() - self.since
            self.since = None


def header(ctx: dist.DistContext, run_dir: Path, notes: list[str], dataset: str, wandb: str) -> str:
    """The first line of a run: versions, hardware (with `notes` on CPU), world, dataset, W&B
    and run directory."""
    if ctx.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(ctx.device)} x{ctx.world_size}"
    else:
        threads = torch.get_num_threads()
        cpu = [f"{threads} thread{'s' if threads != 1 else ''} per rank", f"{os.cpu_count()} cores"]
        device = f"cpu ({', '.join(cpu + notes)})"
    return (
        f"lenet-ddp {__version__} | torch {torch.__version__} | python "
        f"{platform.python_version()} | {device} | world {ctx.world_size} ({ctx.launcher}, "
        f"{ctx.backend}) | data {dataset} | {wandb} | run dir {run_dir}"
    )


class Trainer:
    """One training run of `cfg` on this rank of `ctx`."""

    def __init__(
        self,
        cfg: Config,
        ctx: dist.DistContext,
        overrides: str = "",
        print_config: bool = False,
        stop: StopRequest | None = None,
    ):
        self.cfg, self.ctx = cfg, ctx
        # Shown after the header: the overrides line, and every setting with --print-config.
        self.overrides, self.print_config = overrides, print_config
        self.stop = stop or StopRequest()
        self.run_dir = Path(cfg.train.run_dir)
        self.tracker = make_tracker(ctx, self.run_dir)
        self.state = TrainState()
        self.clock = EpochClock(self.state)
        self.last_eval: dict | None = None
        self.resumed = False  # whether build() loaded a checkpoint
        self.git_revision = checkpoint.git_revision()
        self.pending, self.interval_started = 0, 0.0  # steps not yet reported, and since when
        self.saved_at = time.monotonic()  # for checkpoint.every_seconds
        self.lock: run_lock.Held | None = None  # the run directory's, rank 0's for the whole run
        self.profiler = None  # train.profile's, where this rank profiles

    # -- parts and their state ---------------------------------------------------------------
    def build(self) -> None:
        """Data, model and engine on this rank's device; the state of a checkpoint if any."""
        cfg, ctx = self.cfg, self.ctx
        reused_memory = (
            cfg.train.reuse_host_memory and ctx.device.type == "cpu" and reuse_freed_memory()
        )
        self.lock = dist.on_main(ctx, lambda: run_lock.acquire(self.run_dir))
        self.build_data(load_splits(cfg.data, ctx))
        path, saved = checkpoint.load_for_resume(self.run_dir, cfg.train.resume, ctx)
        if saved is not None:
            # One check, on rank 0: a refusal is reported once, however many ranks there are.
            dist.on_main(
                ctx,
                lambda: checkpoint.check_compatible(
                    saved, to_dict(cfg), ctx.world_size, self.steps_per_epoch, path
                ),
            )
        torch.manual_seed(cfg.train.seed)
        model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width).to(ctx.device)
        total = self.steps_per_epoch * cfg.train.epochs
        self.engine = Engine(model, cfg, ctx, self.steps_per_epoch, total)
        notes = ["malloc reuses freed memory"] if reused_memory else []
        notes += [self.engine.conv_path] if ctx.device.type == "cpu" else []
        log.info(header(ctx, self.run_dir, notes, cfg.data.dataset, wandb_status(cfg.tracking)))
        if saved is not None:
            self.load_state_dict(saved)
            if not self.finished():
                self.announce_resume(path, saved["world_size"])
        self.resumed = saved is not None

    def build_data(self, raw: dict[str, torch.Tensor]) -> None:
        """This rank's training batches and test images, on its device."""
        cfg, ctx = self.cfg, self.ctx
        micro = cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum)
        self.steps_per_epoch = steps_per_epoch(
            len(raw["train_labels"]), micro, ctx.world_size, cfg.train.grad_accum
        )
        if self.steps_per_epoch == 0:
            dist.raise_on_main(
                ctx,
                ConfigError(
                    f"config key train.batch_size: {cfg.train.batch_size} is larger than the "
                    f"training set ({len(raw['train_labels'])} images); lower it"
                ),
            )
        data = to_device(raw, ctx.device)
        test = eval_indices(len(data.test_y), ctx.rank, ctx.world_size).to(ctx.device)
        self.test_x, self.test_y = data.test_x[test], data.test_y[test]
        self.batches = TrainBatches(
            data.train_x, data.train_y, micro, ctx.rank, ctx.world_size, cfg.train.seed
        )

    def announce_resume(self, path: Path, saved_world: int) -> None:
        s, t, world = self.state, self.cfg.train, self.ctx.world_size
        log.info(
            f"resumed from {path} (epoch {s.epoch + 1}, step {s.step_in_epoch}/"
            f"{self.steps_per_epoch}, global step {s.global_step})"
        )
        if saved_world != world:
            log.info(
                f"world {saved_world} -> {world}: the same global batch of {t.batch_size} per "
                f"step, now {world} rank(s) x {t.grad_accum} micro-step(s) x "
                f"{t.batch_size // (world * t.grad_accum)} images"
            )

    def close(self) -> None:
        """Let go of the run directory, however the run ended."""
        run_lock.release(self.lock)
        self.lock = None

    def meta(self) -> dict:
        """Facts about the job that go with the config into the tracker."""
        ctx = self.ctx
        return {
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "device": str(ctx.device),
            "launcher": ctx.launcher,
            "torch_version": str(torch.__version__),
            "git_revision": self.git_revision,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "steps_per_epoch": self.steps_per_epoch,
            "dataset": self.cfg.data.dataset,
        }

    def state_dict(self) -> dict:
        """What a checkpoint holds: the parts' states, this rank's RNG states, and the facts a
        resume checks."""
        return {
            **self.engine.state_dict(),
            **self.state.state_dict(),
            "rng": checkpoint.rng_state(self.ctx.device),
            "config": to_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "run_id": self.tracker.run_id,
            "torch_version": str(torch.__version__),
            "git_revision": self.git_revision,
        }

    def load_state_dict(self, saved: dict) -> None:
        self.engine.load_state_dict(saved)
        self.state.load_state_dict(saved)
        # The epoch's micro-steps are counted over all ranks; on another split of the global
        # batch, count the steps already done in the new unit (the mean loss is unchanged).
        old_split = saved["world_size"] * saved["config"]["train"]["grad_accum"]
        new_split = self.ctx.world_size * self.cfg.train.grad_accum
        if old_split != new_split:
            s = self.state
            s.epoch_micro_steps = s.epoch_micro_steps * new_split // old_split
            s.epoch_loss_sum *= new_split / old_split
        rngs = saved["rng"]  # one per rank that wrote it; a new rank takes rank 0's
        mine = rngs[self.ctx.rank] if self.ctx.rank < len(rngs) else rngs[0]
        checkpoint.set_rng_state(mine, self.ctx.device)
        self.tracker.run_id = saved.get("run_id")

    def save(self) -> None:
        """A checkpoint of the current step (a collective: every rank calls it)."""
        checkpoint.save_all_ranks(
            self.ctx,
            self.run_dir,
            self.state.global_step,
            self.state_dict(),
            self.cfg.checkpoint.keep,
        )
        self.saved_at = time.monotonic()

    # -- the run ------------------------------------------------------------------------------
    def finished(self) -> bool:
        t, s = self.cfg.train, self.state
        return s.epoch >= t.epochs or self.at_max_steps()

    def at_max_steps(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return bool(max_steps and self.state.global_step >= max_steps)

    def run(self) -> None:
        """Train to the end of the configured epochs (or train.max_steps), then finish."""
        self.build()
        cfg = self.cfg
        if self.finished():
            log.info(
                f"nothing to do: the run in {self.run_dir} already finished (global step "
                f"{self.state.global_step}); use another train.run_dir for a new run"
            )
            return
        self.tracker.start(
            cfg,
            self.meta(),
            resumed=self.resumed,
            global_step=self.state.global_step,
            epochs_done=self.state.epoch,
            overrides=self.overrides,
            print_config=self.print_config,
        )
        started = time.perf_counter()
        self.profiler = make_profiler(
            cfg, self.ctx.rank, self.run_dir, self.ctx.device, self.state.global_step
        )
        self.stop.catch_interrupt()
        try:
            while self.state.epoch < cfg.train.epochs:
                full = self.train_epoch()
                self.end_epoch()
                last = not full or self.state.epoch + 1 == cfg.train.epochs
                if full:
                    self.state.next_epoch()
                if last or self.state.epoch % cfg.checkpoint.every_epochs == 0:
                    self.save()
                if last:
                    break
        finally:
            self.stop.restore()
            if self.profiler is not None:
                self.profiler.finish()
        self.finish(time.perf_counter() - started)
        self.end_of_run()

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when train.max_steps ended it early."""
        s = self.state
        self.tracker.start_epoch(
            s.epoch, self.cfg.train.epochs, self.steps_per_epoch, s.step_in_epoch
        )
        micro_batches = self.batches.epoch(
            s.epoch, start=s.step_in_epoch * self.cfg.train.grad_accum
        )
        self.pending, self.interval_started = 0, time.perf_counter()
        self.clock.start()
        while s.step_in_epoch < self.steps_per_epoch and not self.at_max_steps():
            self.step(micro_batches)
            self.after_step()
        self.clock.pause()
        return not self.at_max_steps()

    def step(self, micro_batches) -> None:
        """One optimizer step over the next train.grad_accum micro-batches."""
        first = self.engine.first_step_s is None
        self.engine.train_step([next(micro_batches) for _ in range(self.cfg.train.grad_accum)])
        if first:
            what = "warm-up" if self.cfg.train.compile == "none" else "compilation and warm-up"
            log.info(f"first step: {self.engine.first_step_s:.2f} s ({what})")
        s = self.state
        s.step_in_epoch += 1
        s.global_step += 1
        self.pending += 1

    def after_step(self) -> None:
        """The run's cadence after each step: report, the ranks' stop vote, save."""
        s, t = self.state, self.cfg.train
        if self.profiler is not None:
            self.profiler.after_step(s.global_step)
        if self.report_due():
            self.report_steps()
        save = self.save_due()
        if s.global_step % t.stop_check_every == 0:
            stop_requested, clock_due = self.vote()
            if stop_requested:
                self.stop_and_save()
            save = save or clock_due
        if save:
            self.save_in_epoch()

    def report_due(self) -> bool:
        s = self.state
        return (
            s.global_step % self.cfg.train.log_every == 0
            or self.at_max_steps()
            or s.step_in_epoch == self.steps_per_epoch
        )

    def save_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every and self.state.global_step % every == 0)

    def vote(self) -> tuple[bool, bool]:
        """Whether any rank was asked to stop, and whether checkpoint.every_seconds passed on
        any rank: the ranks' clocks differ, so they agree on the step in one collective."""
        every_s = self.cfg.checkpoint.every_seconds
        clock_due = bool(every_s) and time.monotonic() - self.saved_at >= every_s
        return dist.any_rank(self.ctx, self.stop.requested is not None, clock_due)

    def save_in_epoch(self) -> None:
        """A checkpoint within the epoch; it holds the epoch's train time so far, with its
        images, and the save itself is not counted."""
        self.report_steps()
        self.clock.pause()
        self.save()
        self.clock.start()

    def stop_and_save(self) -> None:
        """A stop was requested on some rank: save, wait for everyone, and end the run."""
        why = self.stop.requested
        self.report_steps()
        self.clock.pause()
        self.save()
        dist.barrier(self.ctx)  # nobody exits before the checkpoint is on disk
        what = (
            "interrupted (Ctrl-C)" if why == "SIGINT" else f"stop requested ({why or 'by a peer'})"
        )
        log.info(
            f"{what}: saved a checkpoint at step {self.state.global_step} in {self.run_dir}; "
            "run the same command again to resume"
        )
        raise Stopped(EXIT_INTERRUPTED if why == "SIGINT" else EXIT_PREEMPTED)

    def report_steps(self) -> None:
        """Read back the loss of the steps since the last report (a collective) and log it."""
        if not self.pending:
            return
        s, world, accum = self.state, self.ctx.world_size, self.cfg.train.grad_accum
        # The read-back waits for the device: the clock is read after it, so that the interval
        # holds its steps' work and no other's.
        loss_sum, finite = self.engine.read_loss()
        now = time.perf_counter()
        steps, seconds = self.pending, now - self.interval_started
        self.pending, self.interval_started = 0, now
        micro = steps * accum * world
        if finite < micro:
            first_bad = s.global_step - steps + finite // (accum * world) + 1
            dist.raise_on_main(
                self.ctx,
                NonFiniteLossError(
                    f"the training loss became non-finite at or after step {first_bad} (epoch "
                    f"{s.epoch + 1}); the last good checkpoint is kept in {self.run_dir}; lower "
                    "optim.lr, or set optim.clip_grad_norm"
                ),
            )
        s.epoch_loss_sum += loss_sum
        s.epoch_micro_steps += micro
        self.tracker.log_step(
            {
                "step": s.global_step,
                "epoch": s.epoch + 1,
                "step_in_epoch": s.step_in_epoch,
                "loss": loss_sum / micro,
                "lr": self.engine.lr,
                "images_per_s": steps * self.cfg.train.batch_size / max(seconds, 1e-9),
                "time_s": time.time(),
            }
        )

    def end_epoch(self) -> None:
        """Evaluate on the whole test set (every image once over the ranks) and log the epoch."""
        cfg, s = self.cfg, self.state
        result = self.engine.evaluate(self.test_x, self.test_y, cfg.train.eval_batch_size)
        per_micro_step = cfg.train.batch_size // cfg.train.grad_accum // self.ctx.world_size
        images = s.epoch_micro_steps * per_micro_step  # micro-steps are counted over all ranks
        record = {
            "epoch": s.epoch + 1,
            "step": s.global_step,
            "train_loss": s.epoch_loss_sum / max(1, s.epoch_micro_steps),
            **result,
            "epoch_time_s": s.epoch_time,
            "images_per_s": images / max(s.epoch_time, 1e-9),
            "lr": self.engine.lr,
            "dataset": cfg.data.dataset,
        }
        s.best_accuracy = max(s.best_accuracy, result["test_accuracy"])
        self.last_eval = record
        self.tracker.log_epoch(record)

    def finish(self, train_time_s: float) -> None:
        """The run's summary: summary.json, and W&B's."""
        self.tracker.finish(
            {
                "dataset": self.cfg.data.dataset,
                "final_accuracy": self.last_eval["test_accuracy"],
                "best_accuracy": self.state.best_accuracy,
                "epochs": self.last_eval["epoch"],
                "global_step": self.state.global_step,
                "train_time_s": train_time_s,
                "first_step_s": self.engine.first_step_s,
            }
        )

    def end_of_run(self) -> None:
        """Every rank ends here together. A rank lost after its last collective would otherwise
        go unnoticed by the others, which exit 0 and leave their torchrun agents waiting for the
        lost one in the exit barrier (300 s); a failed barrier instead makes torchrun re-form
        the smaller world, which finds the run finished and ends at once."""
        dist.barrier(self.ctx)
