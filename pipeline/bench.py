"""`python -m pipeline.bench [--quick] [--repeat N]` (`lenet-bench`): the speed benchmark, the
project's pipeline against the classic tutorial data path, in fresh processes; the cases and
their timing are `pipeline.benchmark`."""

from __future__ import annotations

import argparse
import os

from pipeline import cli

QUICK_STEPS = 150  # optimizer steps a case trains with --quick


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser(
        "pipeline.bench", "The speed benchmark: the pipeline against the classic data path."
    )
    p.add_argument(  # args.quick: the steps of a case, 0 for its config's own
        "--quick",
        action="store_const",
        const=QUICK_STEPS,
        default=0,
        help=f"a fast check: {QUICK_STEPS} steps a case",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each case (medians reported)")
    p.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="train every case with seeds 0..N-1, --repeat times each; accuracy is the mean "
        "over seeds, and time to accuracy is read on that mean (default: the configs' seeds)",
    )
    p.add_argument(
        "--data-root",
        default=os.environ.get("MNIST_ROOT", "data"),
        help="directory holding MNIST/raw (default: $MNIST_ROOT, else data)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--baseline-workers",
        type=int,
        default=-1,
        help="DataLoader worker processes of the baseline (default: 0 on CPU, 4 per GPU)",
    )
    p.add_argument(
        "--out",
        default="runs/bench",
        help="folder for the JSON and markdown (default: runs/bench, in the current directory)",
    )
    p.add_argument(
        "--evals-per-epoch",
        type=int,
        default=0,
        help="test-set evaluations an epoch, the last at its end, for the time to 98%% and 99%% "
        "(untimed; default: 20 on GPUs, whose epochs take milliseconds, else 1)",
    )
    p.add_argument("--only", default="", help="only the cases whose name matches this regex")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="section.key=value",
        help="a config override for every case (repeatable), e.g. --set data.dataset=kmnist",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from pipeline.speed.benchmark.runner import run_benchmark  # torch: only for a run

        return run_benchmark(args, argv)

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
