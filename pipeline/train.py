"""Entry point: `python -m pipeline.train --config FILE [section.key=value ...]`.

The same command runs as one plain process (a gloo group of one), under torchrun, or as srun
tasks of a SLURM job. main(argv): parse -> validate -> init -> build -> resume -> loop -> close.
Errors end in one line on stderr and an exit code listed in `pipeline.errors`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from pipeline import __version__, checkpoint, dist, host, mnist
from pipeline.config import Config, help_text, load_config, to_dict, to_yaml, validate_for_world
from pipeline.data import TrainBatches, eval_indices, to_device
from pipeline.engine import Engine
from pipeline.errors import (
    EXIT_UNEXPECTED,
    DistributedError,
    NonFiniteLossError,
    PipelineError,
    Preempted,
)
from pipeline.model import LeNet
from pipeline.preemption import StopRequest
from pipeline.tracking import make_tracker

# How long a rank that leaves the report of an error to the main rank waits before it exits:
# under torchrun the first worker to exit ends the job, and the main rank's line must get out
# first. A job that is being stopped ends the wait at once.
REPORT_GRACE_S = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train LeNet on MNIST, from one CPU process to many GPUs (torchrun, SLURM).",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, for example optim.lr=0.05 train.epochs=3",
    )
    return parser.parse_args(argv)


def _env_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def header(ctx: dist.DistContext, run_dir: Path, reused_memory: bool, fused_conv: bool) -> str:
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
        f"{ctx.backend}) | run dir {run_dir}"
    )


class Run:
    """The state of one training run and the loop that advances it."""

    def __init__(self, cfg: Config, ctx: dist.DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.train.run_dir)
        self.tracker = make_tracker(ctx, self.run_dir)
        self.global_step = 0
        self.epoch, self.step_in_epoch = 0, 0
        # Epoch totals so far (global over ranks), carried in checkpoints.
        self.epoch_loss_sum, self.epoch_micro_steps, self.epoch_time = 0.0, 0, 0.0
        self.best_accuracy, self.last_eval = 0.0, None

    # -- build ------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        reused_memory = (
            cfg.train.reuse_host_memory and ctx.device.type == "cpu" and host.reuse_freed_memory()
        )
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        path = checkpoint.resolve(self.run_dir, cfg.train.resume, ctx, self.tracker.warn)
        # Rank 0 reads the file; every rank decodes the same bytes (no shared disk needed).
        blob = dist.broadcast_object(ctx, path.read_bytes() if path and ctx.is_main else None)
        saved = checkpoint.parse(blob, path) if blob is not None else None
        if saved is not None:
            checkpoint.check_compatible(saved, to_dict(cfg), ctx.world_size, path)

        root = Path(cfg.data.root)
        raw = dist.leader_then_all(
            ctx, lambda: mnist.prepare(root, download=cfg.data.download), lambda: mnist.load(root)
        )
        data = to_device(raw, ctx.device)
        test = eval_indices(len(data.test_y), ctx.rank, ctx.world_size).to(ctx.device)
        self.test_x, self.test_y = data.test_x[test], data.test_y[test]

        torch.manual_seed(cfg.train.seed)
        model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width).to(ctx.device)
        self.accum = cfg.train.grad_accum
        micro = cfg.train.batch_size // (ctx.world_size * self.accum)
        self.batches = TrainBatches(
            data.train_x, data.train_y, micro, ctx.rank, ctx.world_size, cfg.train.seed
        )
        self.steps_per_epoch = self.batches.micro_steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise PipelineError(
                f"train.batch_size={cfg.train.batch_size} is larger than the training set; lower it"
            )
        total = self.steps_per_epoch * cfg.train.epochs
        self.engine = Engine(
            model, cfg, ctx, self.steps_per_epoch, total, self.tracker.info, self.tracker.warn
        )

        self.tracker.info(header(ctx, self.run_dir, reused_memory, self.engine.fused_conv))
        if saved is not None:
            self.restore(saved)
            self.tracker.info(
                f"resumed from {path} (epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch}/{self.steps_per_epoch}, global step "
                f"{self.global_step})"
            )
        self.tracker.start(
            to_dict(cfg),
            to_yaml(cfg),
            self.meta(),
            resumed=saved is not None,
            global_step=self.global_step,
            epochs_done=self.epoch,
        )

    def meta(self) -> dict:
        """Facts about the job that go with the config into the tracker."""
        ctx = self.ctx
        return {
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "device": str(ctx.device),
            "launcher": ctx.launcher,
            "torch_version": str(torch.__version__),
            "git_revision": checkpoint.git_revision(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def state(self) -> dict:
        return {
            **self.engine.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_micro_steps": self.epoch_micro_steps,
            "epoch_time": self.epoch_time,
            "best_accuracy": self.best_accuracy,
            "rng": checkpoint.rng_state(),
            "config": to_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "run_id": self.tracker.run_id,
            "torch_version": str(torch.__version__),
            "git_revision": checkpoint.git_revision(),
        }

    def restore(self, saved: dict) -> None:
        self.engine.load_state_dict(saved)
        checkpoint.set_rng_state(saved["rng"][self.ctx.rank])
        self.epoch, self.step_in_epoch = saved["epoch"], saved["step_in_epoch"]
        self.global_step = saved["global_step"]
        self.epoch_loss_sum = saved["epoch_loss_sum"]
        self.epoch_micro_steps = saved["epoch_micro_steps"]
        self.epoch_time, self.best_accuracy = saved["epoch_time"], saved["best_accuracy"]
        self.tracker.run_id = saved.get("run_id")

    def save(self) -> None:
        checkpoint.save_all_ranks(
            self.ctx, self.run_dir, self.global_step, self.state(), self.cfg.checkpoint.keep
        )

    # -- loop -------------------------------------------------------------------------------
    def flush(self, steps: int, seconds: float) -> None:
        """Read the device loss sums of the last `steps` steps (a collective) and report them."""
        e = self.engine
        totals = torch.stack([e.loss_sum.double(), e.finite_steps.double()])
        dist.all_reduce_sum(totals)
        loss_sum, finite = totals.tolist()
        e.loss_sum.zero_()
        micro = steps * self.accum * self.ctx.world_size
        if finite < micro:
            first_bad = (
                self.global_step - steps + int(finite) // (self.accum * self.ctx.world_size) + 1
            )
            raise NonFiniteLossError(
                f"the training loss became non-finite at or after step {first_bad} (epoch "
                f"{self.epoch + 1}); the last good checkpoint is kept in {self.run_dir}; lower "
                "optim.lr, or set optim.clip_grad_norm"
            )
        e.finite_steps.zero_()
        self.epoch_loss_sum += loss_sum
        self.epoch_micro_steps += micro
        images = steps * self.cfg.train.batch_size
        self.tracker.log_step(
            {
                "step": self.global_step,
                "epoch": self.epoch + 1,
                "step_in_epoch": self.step_in_epoch,
                "loss": loss_sum / max(1, micro),
                "lr": e.lr,
                "images_per_s": images / max(seconds, 1e-9),
                "time_s": time.time(),
            }
        )

    def run_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of the current epoch; False when max_steps ended training early."""
        cfg = self.cfg
        self.tracker.start_epoch(self.epoch, cfg.train.epochs, self.steps_per_epoch)
        micro_batches = self.batches.epoch(self.epoch, start=self.step_in_epoch * self.accum)
        t_interval = t_epoch = time.perf_counter()
        pending = 0  # steps since the last flush
        while self.step_in_epoch < self.steps_per_epoch:
            first = self.engine.first_step_s is None
            self.engine.train_step([next(micro_batches) for _ in range(self.accum)])
            if first:
                what = "warm-up" if cfg.train.compile == "none" else "compilation and warm-up"
                self.tracker.info(f"first step: {self.engine.first_step_s:.2f} s ({what})")
            self.step_in_epoch += 1
            self.global_step += 1
            pending += 1
            self.maybe_inject_fault()
            done = self.step_in_epoch == self.steps_per_epoch or (
                cfg.train.max_steps and self.global_step >= cfg.train.max_steps
            )
            if self.global_step % cfg.train.log_every == 0 or done:
                now = time.perf_counter()
                self.flush(pending, now - t_interval)
                pending, t_interval = 0, now
            if self.global_step % cfg.train.stop_check_every == 0 and dist.any_rank(
                self.ctx, stop.requested is not None
            ):
                self.preempt(pending, t_interval, t_epoch, stop.requested)
            if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0:
                if pending:
                    now = time.perf_counter()
                    self.flush(pending, now - t_interval)
                    pending, t_interval = 0, now
                self.save()
            if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                self.epoch_time += time.perf_counter() - t_epoch
                return False
        self.epoch_time += time.perf_counter() - t_epoch
        return True

    def preempt(self, pending: int, t_interval: float, t_epoch: float, signal: str) -> None:
        now = time.perf_counter()
        if pending:
            self.flush(pending, now - t_interval)
        self.epoch_time += now - t_epoch
        self.save()
        dist.barrier(self.ctx)  # nobody exits before the checkpoint is on disk
        self.tracker.info(
            f"stop requested ({signal or 'by a peer'}): saved a checkpoint at "
            f"step {self.global_step} in {self.run_dir}; run the same command "
            "again to resume"
        )
        raise Preempted()

    def maybe_inject_fault(self) -> None:
        d = self.cfg.debug
        if (
            self.ctx.rank == d.fail_rank
            and self.global_step == d.fail_step
            and dist.restart_count() == 0
        ):
            sys.stderr.write(
                f"debug: rank {self.ctx.rank} exits at step {self.global_step} "
                "(debug.fail_rank/fail_step)\n"
            )
            sys.stderr.flush()
            os._exit(17)

    def end_epoch(self) -> None:
        cfg = self.cfg
        result = self.engine.evaluate(self.test_x, self.test_y, cfg.train.eval_batch_size)
        images = (
            self.epoch_micro_steps
            * (cfg.train.batch_size // cfg.train.grad_accum)
            // self.ctx.world_size
        )
        record = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "train_loss": self.epoch_loss_sum / max(1, self.epoch_micro_steps),
            "test_loss": result["test_loss"],
            "test_accuracy": result["test_accuracy"],
            "test_count": result["test_count"],
            "epoch_time_s": self.epoch_time,
            "images_per_s": images / max(self.epoch_time, 1e-9),
            "lr": self.engine.lr,
        }
        self.best_accuracy = max(self.best_accuracy, result["test_accuracy"])
        self.last_eval = record
        self.tracker.log_epoch(record)

    def loop(self) -> None:
        cfg = self.cfg
        if self.epoch >= cfg.train.epochs or (
            cfg.train.max_steps and self.global_step >= cfg.train.max_steps
        ):
            self.tracker.info(
                f"nothing to do: the run in {self.run_dir} already finished "
                f"(global step {self.global_step}); use another train.run_dir "
                "for a new run"
            )
            return
        stop = StopRequest(("SIGTERM", cfg.train.preempt_signal))
        started = time.perf_counter()
        try:
            while self.epoch < cfg.train.epochs:
                full = self.run_epoch(stop)
                self.end_epoch()
                last = not full or self.epoch + 1 == cfg.train.epochs
                if full:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    self.epoch_loss_sum, self.epoch_micro_steps, self.epoch_time = 0.0, 0, 0.0
                if last or self.epoch % cfg.checkpoint.every_epochs == 0:
                    self.save()
                if last:
                    break
        finally:
            stop.restore()
        self.tracker.finish(
            {
                "final_accuracy": self.last_eval["test_accuracy"],
                "best_accuracy": self.best_accuracy,
                "epochs": self.last_eval["epoch"],
                "global_step": self.global_step,
                "train_time_s": time.perf_counter() - started,
                "first_step_s": self.engine.first_step_s,
            }
        )


def _is_collective_failure(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(
        k in text for k in ("gloo", "nccl", "connection closed", "timed out", "connection reset")
    )


def _describe_collective_failure(e: Exception, timeout_s: float) -> DistributedError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "timed out" in str(e).lower() or "timeout" in str(e).lower():
        return DistributedError(
            f"a collective waited more than dist.timeout_s={timeout_s:g} s "
            f"for a peer rank that stopped responding ({text})"
        )
    return DistributedError(f"lost contact with a peer rank ({text}); see that rank's error")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx: dist.DistContext | None = None
    cfg: Config | None = None
    run: Run | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = dist.detect()
        validate_for_world(cfg, ctx.world_size)
        dist.init(ctx, cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
        run = Run(cfg, ctx)
        run.build()
        run.loop()
        return 0
    except Preempted as e:
        run.tracker.close(e.exit_code)
        return e.exit_code
    except dist.PeerFailed as e:
        return e.exit_code
    except PipelineError as e:
        # Errors every rank meets alike are reported once; a leader's data error where it
        # happened.
        if (ctx.is_main if ctx else _env_rank() == 0) or getattr(e, "report_here", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif (ctx.world_size if ctx else int(os.environ.get("WORLD_SIZE", "1"))) > 1:
            time.sleep(REPORT_GRACE_S)
        if run is not None:
            run.tracker.close(e.exit_code)
        return e.exit_code
    except (torch.distributed.DistError, RuntimeError) as e:
        if not _is_collective_failure(e):
            raise
        err = _describe_collective_failure(e, cfg.dist.timeout_s if cfg else 0)
        print(
            f"error (rank {ctx.rank if ctx else _env_rank()}): {err}", file=sys.stderr, flush=True
        )
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        return EXIT_UNEXPECTED
    finally:
        run = None  # the model goes before the process group (see dist.shutdown)
        dist.shutdown()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
