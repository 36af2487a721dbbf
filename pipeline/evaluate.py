"""`python -m pipeline.evaluate RUN_DIR|CKPT` (`lenet-evaluate`): test accuracy (overall and per
class), confusion matrix and the most confident mistakes of a trained model, in one process or
under torchrun. The work is `pipeline.trained.evaluation`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import cli
from pipeline.config.schema import DistConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser(
        "pipeline.evaluate",
        "Test accuracy (overall and per class), confusion matrix and the most confident "
        "mistakes of a trained model. Runs as one process or under torchrun.",
    )
    cli.add_target_arguments(parser)
    parser.add_argument(
        "--data-root",
        type=Path,
        help="directory holding the run's dataset (MNIST/raw, ...; default: the run's data.root)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write (default, beside the checkpoint: eval/ for a run directory or a "
        "best.pt; eval-NAME/ for --last or another checkpoint file)",
    )
    parser.add_argument(
        "--mistakes", type=int, default=24, help="how many mistakes to show (default 24)"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto"
    )
    parser.add_argument(
        "--tracking",
        choices=("auto", "online", "offline", "disabled"),
        help="send the results to W&B (default: the run's tracking.mode)",
    )
    args = parser.parse_args(argv)
    if args.mistakes < 0:
        parser.error("--mistakes must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from pipeline.dist import group  # torch: only for a run, not for --help
        from pipeline.trained import evaluation

        try:
            ctx = group.detect()
            group.init(ctx, DistConfig(device=args.device))
            evaluation.run(
                ctx, args.target, args.data_root, args.out, args.mistakes, args.tracking, args.last
            )
            return 0
        finally:
            group.shutdown()

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
