"""The training run: build its parts, resume, train epochs, evaluate, save, report.

A `Trainer` wires the parts of a run: the device-resident data of this rank, the `Engine`
(model, optimizer, schedule, scaler), the `TrainState` (where the run is) and the tracker. The
engine and the state each give `state_dict()` / `load_state_dict()`; a checkpoint is what
`Trainer.state_dict()` gathers from them, with the RNG states and the facts a resume checks.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import __version__, checkpoint, dist, host, mnist, run_lock
from pipeline.config import Config, DebugConfig, to_dict
from pipeline.data import TrainBatches, eval_indices, to_device
from pipeline.engine import Engine
from pipeline.errors import NonFiniteLossError, PipelineError, Preempted
from pipeline.model import LeNet
from pipeline.preemption import StopRequest
from pipeline.tracking import make_tracker, wandb_status


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


def header(
    ctx: dist.DistContext,
    run_dir: Path,
    reused_memory: bool,
    fused_conv: bool,
    dataset: str,
    wandb: str,
) -> str:
    """The first line of a run: versions, hardware, world, dataset, W&B and run directory."""
    if ctx.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(ctx.device)} x{ctx.world_size}"
    else:
        threads = torch.get_num_threads()
        notes = [
            f"{threads} thread{'s' if threads != 1 else ''} per rank",
            f"{os.cpu_count()} cores",
        ]
        notes += ["malloc reuses freed memory"] if reused_memory else []
        notes += ["fused conv kernels"] if fused_conv else []
        device = f"cpu ({', '.join(notes)})"
    return (
        f"lenet-ddp {__version__} | torch {torch.__version__} | python "
        f"{platform.python_version()} | {device} | world {ctx.world_size} ({ctx.launcher}, "
        f"{ctx.backend}) | data {dataset} | {wandb} | run dir {run_dir}"
    )


def exit_if_fault_injected(debug: DebugConfig, rank: int, step: int) -> None:
    """Test only: end this rank abruptly at `debug.fail_step` (0: the end of the run), on a job's
    first attempt; with `debug.fail_agent`, its torchrun agent first, as when a node dies."""
    if rank == debug.fail_rank and step == debug.fail_step and dist.restart_count() == 0:
        what = "and its torchrun agent " if debug.fail_agent else ""
        sys.stderr.write(f"debug: rank {rank} {what}exits at step {step} (debug.fail_*)\n")
        sys.stderr.flush()
        if debug.fail_agent and "TORCHELASTIC_RUN_ID" in os.environ:
            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(17)


class Trainer:
    """One training run of `cfg` on this rank of `ctx`."""

    def __init__(
        self, cfg: Config, ctx: dist.DistContext, overrides: str = "", print_config: bool = False
    ):
        self.cfg, self.ctx = cfg, ctx
        # Shown after the header: the overrides line, and every setting with --print-config.
        self.overrides, self.print_config = overrides, print_config
        self.run_dir = Path(cfg.train.run_dir)
        self.tracker = make_tracker(ctx, self.run_dir)
        self.state = TrainState()
        self.last_eval: dict | None = None
        self.resumed = False  # whether build() loaded a checkpoint
        self.git_revision = checkpoint.git_revision()
        self.pending, self.interval_started = 0, 0.0  # steps not yet reported, and since when
        self.saved_at = time.monotonic()  # for checkpoint.every_seconds
        self.lock = None  # the run directory's, held by rank 0 for the whole run

    # -- parts and their state ---------------------------------------------------------------
    def build(self) -> None:
        """Data, model and engine on this rank's device; the state of a checkpoint if any."""
        cfg, ctx = self.cfg, self.ctx
        reused_memory = (
            cfg.train.reuse_host_memory and ctx.device.type == "cpu" and host.reuse_freed_memory()
        )
        self.lock = dist.on_main(ctx, lambda: run_lock.acquire(self.run_dir, self.tracker.info))
        path, saved = checkpoint.load_for_resume(
            self.run_dir, cfg.train.resume, ctx, self.tracker.warn
        )

        root, name = Path(cfg.data.root), cfg.data.dataset
        raw = dist.leader_then_all(
            ctx,
            lambda: mnist.prepare(
                root, download=cfg.data.download, dataset=name, mirrors=cfg.data.mirror_list()
            ),
            lambda: mnist.load(root, name),
        )
        data = to_device(raw, ctx.device)
        test = eval_indices(len(data.test_y), ctx.rank, ctx.world_size).to(ctx.device)
        self.test_x, self.test_y = data.test_x[test], data.test_y[test]

        torch.manual_seed(cfg.train.seed)
        model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width).to(ctx.device)
        micro = cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum)
        self.batches = TrainBatches(
            data.train_x, data.train_y, micro, ctx.rank, ctx.world_size, cfg.train.seed
        )
        self.steps_per_epoch = self.batches.micro_steps_per_epoch // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise PipelineError(
                f"train.batch_size={cfg.train.batch_size} is larger than the training set; lower it"
            )
        if saved is not None:
            checkpoint.check_compatible(
                saved, to_dict(cfg), ctx.world_size, self.steps_per_epoch, path
            )
        total = self.steps_per_epoch * cfg.train.epochs
        self.engine = Engine(
            model, cfg, ctx, self.steps_per_epoch, total, self.tracker.info, self.tracker.warn
        )

        self.tracker.info(
            header(
                ctx,
                self.run_dir,
                reused_memory,
                self.engine.fused_conv,
                cfg.data.dataset,
                wandb_status(cfg.tracking),
            )
        )
        if saved is not None:
            self.load_state_dict(saved)
            s = self.state
            if not self.finished():
                self.tracker.info(
                    f"resumed from {path} (epoch {s.epoch + 1}, step {s.step_in_epoch}/"
                    f"{self.steps_per_epoch}, global step {s.global_step})"
                )
                if saved["world_size"] != ctx.world_size:
                    self.tracker.info(
                        f"world {saved['world_size']} -> {ctx.world_size}: the same global "
                        f"batch of {cfg.train.batch_size} per step, now {ctx.world_size} "
                        f"rank(s) x {cfg.train.grad_accum} micro-step(s) x "
                        f"{cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum)} images"
                    )
        self.resumed = saved is not None

    def close(self) -> None:
        """Let go of the run directory, however the run ended."""
        run_lock.release(self.run_dir, self.lock)
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

    # -- the loop -----------------------------------------------------------------------------
    def finished(self) -> bool:
        t, s = self.cfg.train, self.state
        return s.epoch >= t.epochs or bool(t.max_steps and s.global_step >= t.max_steps)

    def run(self) -> None:
        """Train to the end of the configured epochs (or train.max_steps), then finish."""
        self.build()
        cfg = self.cfg
        if self.finished():
            self.tracker.info(
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
        stop = StopRequest(("SIGTERM", cfg.train.preempt_signal))
        started = time.perf_counter()
        try:
            while self.state.epoch < cfg.train.epochs:
                full = self.train_epoch(stop)
                self.end_epoch()
                last = not full or self.state.epoch + 1 == cfg.train.epochs
                if full:
                    self.state.next_epoch()
                if last or self.state.epoch % cfg.checkpoint.every_epochs == 0:
                    self.save()
                if last:
                    break
        finally:
            stop.restore()
        self.tracker.finish(
            {
                "dataset": cfg.data.dataset,
                "final_accuracy": self.last_eval["test_accuracy"],
                "best_accuracy": self.state.best_accuracy,
                "epochs": self.last_eval["epoch"],
                "global_step": self.state.global_step,
                "train_time_s": time.perf_counter() - started,
                "first_step_s": self.engine.first_step_s,
            }
        )
        exit_if_fault_injected(cfg.debug, self.ctx.rank, 0)
        # Every rank ends here together. A rank lost after its last collective would otherwise
        # go unnoticed by the others, which exit 0 and leave their torchrun agents waiting for
        # the lost one in the exit barrier (300 s); a failed barrier instead makes torchrun
        # re-form the smaller world, which finds the run finished and ends at once.
        dist.barrier(self.ctx)

    def train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of the current epoch; False when train.max_steps ended it early."""
        cfg, ctx, s = self.cfg, self.ctx, self.state
        accum, max_steps = cfg.train.grad_accum, cfg.train.max_steps
        every_steps, every_s = cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds
        self.tracker.start_epoch(s.epoch, cfg.train.epochs, self.steps_per_epoch, s.step_in_epoch)
        micro_batches = self.batches.epoch(s.epoch, start=s.step_in_epoch * accum)
        epoch_started = self.interval_started = time.perf_counter()
        self.pending = 0
        at_max = False
        while s.step_in_epoch < self.steps_per_epoch and not at_max:
            first = self.engine.first_step_s is None
            self.engine.train_step([next(micro_batches) for _ in range(accum)])
            if first:
                what = "warm-up" if cfg.train.compile == "none" else "compilation and warm-up"
                self.tracker.info(f"first step: {self.engine.first_step_s:.2f} s ({what})")
            s.step_in_epoch += 1
            s.global_step += 1
            self.pending += 1
            exit_if_fault_injected(cfg.debug, ctx.rank, s.global_step)
            if cfg.debug.step_sleep_s:
                time.sleep(cfg.debug.step_sleep_s)
            at_max = bool(max_steps and s.global_step >= max_steps)
            if (
                s.global_step % cfg.train.log_every == 0
                or at_max
                or s.step_in_epoch == self.steps_per_epoch
            ):
                self.report_steps()
            save = bool(every_steps and s.global_step % every_steps == 0)
            if s.global_step % cfg.train.stop_check_every == 0:
                # The ranks' clocks differ: they agree on the step to save at, with the stop
                # request, in one collective.
                due = bool(every_s) and time.monotonic() - self.saved_at >= every_s
                stop_requested, due = dist.any_rank(ctx, stop.requested is not None, due)
                if stop_requested:
                    s.epoch_time += time.perf_counter() - epoch_started
                    self.stop_and_save(stop.requested)
                save = save or due
            if save:
                self.report_steps()
                # The checkpoint holds the epoch's train time so far, with its images: a run
                # resumed from it reports the whole epoch's speed. The save itself is not counted.
                s.epoch_time += time.perf_counter() - epoch_started
                self.save()
                epoch_started = time.perf_counter()
        s.epoch_time += time.perf_counter() - epoch_started
        return not at_max

    def report_steps(self) -> None:
        """Read back the loss of the steps since the last report (a collective) and log it."""
        if not self.pending:
            return
        loss_sum, finite = self.engine.read_loss()  # waits for the device: read the clock after
        now = time.perf_counter()
        steps, seconds = self.pending, now - self.interval_started
        self.pending, self.interval_started = 0, now
        s, world, accum = self.state, self.ctx.world_size, self.cfg.train.grad_accum
        micro = steps * accum * world
        if finite < micro:
            first_bad = s.global_step - steps + finite // (accum * world) + 1
            raise NonFiniteLossError(
                f"the training loss became non-finite at or after step {first_bad} (epoch "
                f"{s.epoch + 1}); the last good checkpoint is kept in {self.run_dir}; lower "
                "optim.lr, or set optim.clip_grad_norm"
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

    def stop_and_save(self, signal: str | None) -> None:
        """A stop was requested on some rank: save, wait for everyone, and end the run."""
        self.report_steps()
        self.save()
        dist.barrier(self.ctx)  # nobody exits before the checkpoint is on disk
        self.tracker.info(
            f"stop requested ({signal or 'by a peer'}): saved a checkpoint at step "
            f"{self.state.global_step} in {self.run_dir}; run the same command again to resume"
        )
        raise Preempted()

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
