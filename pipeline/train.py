"""Entry point: `python -m pipeline.train --config FILE [section.key=value ...]`.

The same command runs as one plain process (a gloo group of one), under torchrun, or as srun
tasks of a SLURM job. main(argv): parse -> validate -> init -> train -> exit code. The run itself
is `pipeline.trainer.Trainer`. Errors end in one line on stderr and an exit code listed in
`pipeline.errors`.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from pipeline import dist
from pipeline.config import Config, help_text, load_config, validate_for_world
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    PipelineError,
    Preempted,
    RunDirError,
    describe,
)
from pipeline.tracking import describe_overrides
from pipeline.trainer import Trainer

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
    parser.add_argument(
        "--config", help="YAML config file (configs/*.yaml); may stand anywhere among the overrides"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting when training starts (they are always saved in "
        "RUN_DIR/config.yaml)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, for example optim.lr=0.05 train.epochs=3",
    )
    # Intermixed: launch scripts put their own overrides before the user's --config.
    return parser.parse_intermixed_args(argv)


def report(e: PipelineError, ctx: dist.DistContext | None) -> None:
    """One line for an error every rank meets alike, from the main rank; a leader's data error
    where it happened. The other ranks wait a moment so that the line gets out."""
    main_rank = ctx.is_main if ctx else dist.env_rank() == 0
    if main_rank or getattr(e, "report_here", False):
        print(f"error: {e}", file=sys.stderr, flush=True)
    elif (ctx.world_size if ctx else dist.env_world_size()) > 1:
        time.sleep(REPORT_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx: dist.DistContext | None = None
    cfg: Config | None = None
    trainer: Trainer | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = dist.detect()
        validate_for_world(cfg, ctx.world_size)
        dist.init(ctx, cfg.dist)
        shown = describe_overrides(args.config, args.overrides, cfg)
        trainer = Trainer(cfg, ctx, shown, args.print_config)
        trainer.run()
        return 0
    except Preempted as e:
        trainer.tracker.close(e.exit_code)
        return e.exit_code
    except dist.PeerFailed as e:
        return e.exit_code
    except PipelineError as e:
        report(e, ctx)
        if trainer is not None:
            trainer.tracker.close(e.exit_code)
        return e.exit_code
    except OSError as e:  # writing the run directory: no space, removed, not writable
        err = RunDirError(
            f"cannot write {e.filename or (cfg and cfg.train.run_dir)}: "
            f"{e.strerror or describe(e)}; the checkpoints already there are kept; free space, "
            "or choose a writable train.run_dir, and run again to resume"
        )
        report(err, ctx)
        return err.exit_code
    except RuntimeError as e:  # torch.distributed.DistError included
        err = dist.collective_failure(e, cfg.dist.timeout_s if cfg else 0)
        if err is None:
            raise
        rank = ctx.rank if ctx else dist.env_rank()
        print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        return EXIT_UNEXPECTED
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # the model goes before the process group (see dist.shutdown)
        dist.shutdown()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
