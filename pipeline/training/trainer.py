"""The training run: resume, train epochs, evaluate, select, save, report.

`build_trainer` builds a run's parts in the order it needs them: the run directory's lock, the
data (`RunData`), the checkpoint to resume from (checked before the `Engine` is built), the
tracker, the `Checkpoints` and the `Selection`; a `Trainer` is given them (a test gives it fakes,
tests/fakes.py) and owns the `TrainState` (where the run is). The engine, the state and the
selection each give `state_dict()` / `load_state_dict()`; a checkpoint is what
`Trainer.state_dict()` gathers from them, with the RNG states and the facts a resume checks.

The loop is small named steps: `train_epoch` runs `step` and then `after_step`, the cadence of
the run (report every train.log_every steps, save by steps and by the clock, the ranks' stop
vote), each in a method of its own; the epoch's train time has one owner, `EpochClock`.
`end_epoch` evaluates (the validation split, or the test set without one) and judges the epoch;
the best one is saved as best.pt, and `finish` tests the model the run ends with, once
(`Selection.final_test`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config.schema import Config, micro_batch, to_dict
from pipeline.data.device import load_splits
from pipeline.data.sets import RunData
from pipeline.dist import group
from pipeline.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteLossError, Stopped
from pipeline.model import LeNet
from pipeline.tracking.header import header, meta
from pipeline.tracking.tracker import Tracker, make_tracker, tracking_status
from pipeline.training import checkpoint, lock
from pipeline.training.engine import Engine
from pipeline.training.profiling import make as make_profiler
from pipeline.training.selection import Selection, closing_line
from pipeline.training.stop import StopRequest

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


def build_trainer(
    cfg: Config,
    ctx: group.DistContext,
    stop: StopRequest,
    overrides: str = "",
    print_config: bool = False,
) -> Trainer:
    """The parts of a run on this rank's device, and its Trainer (see the module's text); the
    run header is logged before a resume's line. Where building fails, the lock is let go here;
    otherwise `Trainer.close` lets it go."""
    run_dir = Path(cfg.train.run_dir)
    held = group.on_main(ctx, lambda: lock.acquire(run_dir))
    try:
        data = RunData.build(load_splits(cfg.data, ctx), cfg, ctx)
        path, saved = checkpoint.load_for_resume(run_dir, cfg.train.resume, ctx)
        if saved is not None:
            # One check, on rank 0: a refusal is reported once, however many ranks there are.
            group.on_main(
                ctx,
                lambda: checkpoint.check_compatible(
                    saved, to_dict(cfg), ctx.world_size, data.steps_per_epoch, path, data.split
                ),
            )
        torch.manual_seed(cfg.train.seed)
        model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width).to(ctx.device)
        engine = Engine(
            model, cfg, ctx, data.steps_per_epoch, data.steps_per_epoch * cfg.train.epochs
        )
        log.info(
            header(
                ctx, run_dir, engine.speed_notes, cfg.data.dataset, tracking_status(cfg.tracking)
            )
        )
        trainer = Trainer(
            cfg,
            ctx,
            engine,
            data,
            make_tracker(ctx, cfg),
            checkpoint.Checkpoints(ctx, run_dir, cfg.checkpoint.keep),
            Selection.from_config(cfg),
            stop,
            overrides=overrides,
            print_config=print_config,
            git_revision=checkpoint.git_revision(),
            held=held,
        )
        if saved is not None:
            trainer.resume(path, saved)
        return trainer
    except BaseException:
        lock.release(held)
        raise


class Trainer:
    """One training run of `cfg` on this rank of `ctx`, with the parts `build_trainer` builds
    (or a test's fakes)."""

    def __init__(
        self,
        cfg: Config,
        ctx: group.DistContext,
        engine: Engine,
        data: RunData,
        tracker: Tracker,
        checkpoints: checkpoint.Checkpoints,
        selection: Selection,
        stop: StopRequest,
        *,
        overrides: str = "",
        print_config: bool = False,
        git_revision: str | None = None,
        held: lock.Held | None = None,
    ):
        self.cfg, self.ctx, self.engine, self.data = cfg, ctx, engine, data
        self.tracker, self.checkpoints, self.selection = tracker, checkpoints, selection
        self.stop = stop
        # Shown after the header: the overrides line, and every setting with --print-config.
        self.overrides, self.print_config = overrides, print_config
        self.git_revision = git_revision
        self.lock = held  # the run directory's, rank 0's for the whole run
        self.run_dir = Path(cfg.train.run_dir)
        self.steps_per_epoch = data.steps_per_epoch
        self.state = TrainState()
        self.clock = EpochClock(self.state)
        self.last_eval: dict | None = None
        self.resumed = False  # whether resume() loaded a checkpoint
        self.pending, self.interval_started = 0, 0.0  # steps not yet reported, and since when
        self.saved_at = time.monotonic()  # for checkpoint.every_seconds
        self.profiler = None  # train.profile's, where this rank profiles

    # -- parts and their state ---------------------------------------------------------------
    def resume(self, path: Path, saved: dict) -> None:
        """Take the run up where checkpoint `saved` (read from `path`) left it."""
        self.load_state_dict(saved)
        self.resumed = True
        if self.finished():
            return  # run() says so
        s, t, world = self.state, self.cfg.train, self.ctx.world_size
        saved_world = saved["world_size"]
        log.info(
            f"resumed from {path} (epoch {s.epoch + 1}, step {s.step_in_epoch}/"
            f"{self.steps_per_epoch}, global step {s.global_step})"
        )
        if saved_world != world:
            log.info(
                f"world {saved_world} -> {world}: the same global batch of {t.batch_size} per "
                f"step, now {world} rank(s) x {t.grad_accum} micro-step(s) x "
                f"{micro_batch(t, world)} images"
            )

    def close(self) -> None:
        """Let go of the run directory, however the run ended."""
        lock.release(self.lock)
        self.lock = None

    def state_dict(self) -> dict:
        """What a checkpoint holds: the parts' states, this rank's RNG states, and the facts a
        resume checks."""
        return {
            **self.engine.state_dict(),
            **self.state.state_dict(),
            "selection": self.selection.state_dict(),
            "split": self.data.split,
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
        self.selection.load_state_dict(saved["selection"])
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
        self.checkpoints.save(self.state.global_step, self.state_dict())
        self.saved_at = time.monotonic()

    def save_best(self) -> None:
        """best.pt: the checkpoint of the epoch just selected (a collective)."""
        sel = self.selection
        best = {"epoch": sel.best_epoch, "step": sel.best_step, "metric": sel.metric}
        best["value"] = sel.best_value
        self.checkpoints.save(self.state.global_step, self.state_dict(), best)

    # -- the run ------------------------------------------------------------------------------
    def finished(self) -> bool:
        t, s = self.cfg.train, self.state
        return s.epoch >= t.epochs or self.at_max_steps() or self.selection.stopped

    def at_max_steps(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return bool(max_steps and self.state.global_step >= max_steps)

    def run(self) -> None:
        """Train to the end of the configured epochs (or train.max_steps), then finish."""
        cfg = self.cfg
        if self.finished():
            why = {  # a trial cut short can go on; any finished run can start again elsewhere
                "early_stop": f", stopped early after epoch {self.state.epoch})",
                "max_steps": f", at train.max_steps={cfg.train.max_steps}); train it on with "
                f"`train.run_dir={self.run_dir} train.max_steps=N` (0: to its epochs)",
            }.get(self.stop_reason(), ")")
            log.info(
                f"nothing to do: the run in {self.run_dir} already finished (global step "
                f"{self.state.global_step}{why}; for a new run use another train.run_dir or "
                f"remove {self.run_dir}"
            )
            return
        self.tracker.start(
            cfg,
            meta(self.ctx, cfg.data.dataset, self.steps_per_epoch, self.git_revision),
            split=self.data.split,
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
                improved = self.end_epoch()
                last = not full or self.state.epoch + 1 == cfg.train.epochs
                last = last or self.selection.stopped
                if full:
                    self.state.next_epoch()
                # best.pt first: a checkpoint that names an epoch as the best is never on disk
                # before the best.pt of that epoch.
                if improved and cfg.checkpoint.keep_best:
                    self.save_best()
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
        micro_batches = self.data.batches.epoch(
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
        return group.any_rank(self.ctx, self.stop.requested is not None, clock_due)

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
        group.barrier(self.ctx)  # nobody exits before the checkpoint is on disk
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
            group.raise_on_main(
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

    def end_epoch(self) -> bool:
        """Evaluate and log the epoch, and judge it for selection and early stopping (every
        rank agrees on the verdict); whether it is the best epoch so far."""
        cfg, s = self.cfg, self.state
        per_micro_step = micro_batch(cfg, self.ctx.world_size)
        images = s.epoch_micro_steps * per_micro_step  # micro-steps are counted over all ranks
        record = {
            "epoch": s.epoch + 1,
            "step": s.global_step,
            "train_loss": s.epoch_loss_sum / max(1, s.epoch_micro_steps),
            **self.data.evals.epoch(self.engine),
            "epoch_time_s": s.epoch_time,
            "images_per_s": images / max(s.epoch_time, 1e-9),
            "lr": self.engine.lr,
            "dataset": cfg.data.dataset,
        }
        improved = False
        whole = s.step_in_epoch == self.steps_per_epoch  # not cut short by train.max_steps
        if whole and self.selection.due(record["epoch"]):
            improved, stop = group.any_rank(self.ctx, *self.selection.propose(record))
            self.selection.accept(record, improved, stop)
        record["best_epoch"] = self.selection.best_epoch
        self.last_eval = record
        self.tracker.log_epoch(record)
        return improved

    def stop_reason(self) -> str:
        if self.selection.stopped:
            return "early_stop"
        return "epochs" if self.state.epoch >= self.cfg.train.epochs else "max_steps"

    def finish(self, train_time_s: float) -> None:
        """Test the model the run ends with; the run's summary (summary.json, and W&B's) and
        its last line."""
        t = self.cfg.train
        best = self.checkpoints if self.cfg.checkpoint.keep_best else None
        summary = {
            "dataset": self.cfg.data.dataset,
            "epochs": self.last_eval["epoch"],
            "global_step": self.state.global_step,
            "stop_reason": self.stop_reason(),
            "val_size": self.cfg.data.val_size,
            **self.selection.summary(),
            **self.selection.final_test(self.engine, self.data.evals, self.last_eval, best),
            "train_time_s": train_time_s,
            "first_step_s": self.engine.first_step_s,
        }
        line = closing_line(summary, t.early_stop_patience, t.early_stop_min_delta)
        self.tracker.finish(summary, line)

    def end_of_run(self) -> None:
        """Every rank ends here together. A rank lost after its last collective would otherwise
        go unnoticed by the others, which exit 0 and leave their torchrun agents waiting for the
        lost one in the exit barrier (300 s); a failed barrier instead makes torchrun re-form
        the smaller world, which finds the run finished and ends at once."""
        group.barrier(self.ctx)
