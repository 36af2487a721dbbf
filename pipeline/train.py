"""Entry point: `python -m pipeline.train --config FILE [section.key=value ...]` (`lenet-train`).

The same command runs as one plain process (a gloo group of one), under torchrun, as srun tasks
of a SLURM job, or, with `--nproc-per-node N`, as N ranks on this machine. main(argv): parse ->
validate -> init -> `pipeline.training.trainer.build_trainer(...).run()` -> exit code; errors
end in one line and the exit code of `pipeline.errors`, through `pipeline.cli`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cli
from pipeline.config.schema import Config, help_text, load_config, validate_for_world
from pipeline.errors import ConfigError
from pipeline.tracking import tensorboard
from pipeline.training.stop import StopRequest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(
        "pipeline.train",
        "Train LeNet on MNIST, from one CPU process to many GPUs (torchrun, SLURM).",
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
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="start N ranks on this machine (torchrun's launcher, run in this process); the "
        "config is checked for the world before they start",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, for example optim.lr=0.05 train.epochs=3",
    )
    # Intermixed: launch scripts put their own overrides before the user's --config.
    args = parser.parse_intermixed_args(agent_overrides(sys.argv[1:] if argv is None else argv))
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be 1 or more")
    return args


def agent_overrides(argv: list[str]) -> list[str]:
    """`--section.key=value` (how `wandb agent` passes a sweep's parameters with `${args}`) as
    the override `section.key=value`; the command's own options have no dot in their name."""
    out = []
    for arg in argv:
        name = arg[2:].partition("=")[0]
        out.append(arg[2:] if arg.startswith("--") and "=" in arg and "." in name else arg)
    return out


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The command line of each rank started by --nproc-per-node."""
    out = ["--config", args.config] if args.config else []
    out += ["--print-config"] if args.print_config else []
    out += ["-v"] if args.verbose else ["-q"] if args.quiet else []
    return out + list(args.overrides)


def resolved_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The command's config, its run directory's template filled in, and the line that names
    the config and what the overrides changed (`pipeline.config.naming`); ConfigError for
    tracking.tensorboard=true without the package, before any process group starts."""
    from pipeline.config import naming  # imports torch (see `train`)

    cfg = load_config(args.config, args.overrides)
    tensorboard.enabled(cfg.tracking.tensorboard)
    try:
        base = load_config(args.config)
    except ConfigError:  # the file alone is invalid: an override fixed it
        base = None
    cfg.train.run_dir = naming.render(
        cfg.train.run_dir, cfg, base or Config(), args.config, args.overrides
    )
    return cfg, naming.describe_overrides(args.config, args.overrides, cfg, base)


def train(args: argparse.Namespace, stop: StopRequest) -> int:
    # torch, and what imports it, only for a run: --help and --version answer at once.
    from pipeline.dist import group, launch
    from pipeline.training.trainer import Trainer, build_trainer

    cfg, shown = resolved_config(args)
    stop.add(cfg.train.preempt_signal)
    ctx = group.detect()
    if args.nproc_per_node > 1 and ctx.launcher == "single":
        validate_for_world(cfg, args.nproc_per_node, group.device_type(cfg.dist))
        return launch.run_local(args.nproc_per_node, _worker_args(args), args.verbose)
    validate_for_world(cfg, ctx.world_size, group.device_type(cfg.dist))
    cli.writing(  # the run directory: no space, removed, not writable
        cfg.train.run_dir,
        "the checkpoints already there are kept; free space, or choose a writable "
        "train.run_dir, and run again to resume",
    )
    trainer: Trainer | None = None
    try:
        group.init(ctx, cfg.dist)
        trainer = build_trainer(cfg, ctx, stop, shown, args.print_config)
        trainer.run()
        return 0
    except BaseException as e:
        if trainer is not None:  # W&B is told how the run ended
            trainer.tracker.close(cli.outcome(e)[0])
        raise
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # the model goes before the process group (see group.shutdown)
        group.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM asks for a stop from the start: a rank that torchrun stops because a peer failed
    # first still reports its own error, and a preempted run saves where it can.
    stop = StopRequest()
    try:
        return cli.run(
            lambda: train(args, stop),
            verbose=cli.verbosity(args),
            interrupted="interrupted (Ctrl-C) while starting: nothing was saved; run the same "
            "command again to start",
        )
    finally:
        stop.restore()


if __name__ == "__main__":
    raise SystemExit(main())
