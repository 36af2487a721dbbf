"""`python -m pipeline.sweep FILE` (`lenet-sweep`): the runs of a sweep file (configs/sweeps/),
on this machine one or N at a time, as a SLURM job array (`--slurm`), or one point of it
(`--point I`, what each array task runs); then the runs side by side (`pipeline.report`).

A point that finished earlier is skipped, one that was interrupted resumes; rerunning the same
command after all finished prints the comparison only. The exit code is 0 when every point
succeeded, else that of the first point that failed (each failure is also listed).
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cli, train
from pipeline.errors import PipelineError
from pipeline.results import compare
from pipeline.sweeps import local, slurm, spec


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = cli.parser(
        "pipeline.sweep",
        "Run a sweep file's points (a grid and/or a list of settings, times seeds) and compare "
        "them; or submit them as a SLURM job array.",
        epilog="Options after -- go to sbatch with --slurm, e.g. -- --partition=cpu --time=1:00:00",
    )
    parser.add_argument(
        "file", help="a sweep file (configs/sweeps/*.yaml), or a shipped one's name"
    )
    parser.add_argument("--list", action="store_true", help="list the points and their state")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="points at a time on this machine"
    )
    parser.add_argument("--slurm", action="store_true", help="submit as one SLURM job array")
    parser.add_argument(
        "--max-running", type=int, default=0, metavar="K", help="--slurm: at most K tasks at once"
    )
    parser.add_argument(
        "--point", type=int, metavar="I", help="run point I only (an array task's job)"
    )
    parser.add_argument(
        "--print-run-dir", action="store_true", help="with --point: print its run directory"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be 1 or more")
    if rest and not args.slurm:
        parser.error("options after -- are sbatch's: give them with --slurm")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, sbatch_options = parse_args(argv)

    def body() -> int:
        sweep = spec.load(args.file)
        if args.point is not None:
            if not 0 <= args.point < len(sweep.points):
                raise PipelineError(
                    f"--point {args.point}: the sweep {sweep.name} has points 0 to "
                    f"{len(sweep.points) - 1}"
                )
            point = sweep.points[args.point]
            if args.print_run_dir:
                print(point.run_dir)
                return 0
            return train.main(point.args)
        if args.list:
            for p in sweep.points:
                print(f"{p.index:3d}  {p.name}  {p.run_dir}  ({local.state(p)})")
            return 0
        if args.slurm:
            job = slurm.submit(sweep, sbatch_options, args.max_running)
            if job is None:
                print(f"every point of {sweep.name} finished: nothing to submit")
            else:
                print(f"submitted the sweep {sweep.name} as job array {job} ({sweep.root})")
            return 0
        outcomes = local.run(sweep, args.parallel, quiet=not args.verbose)
        runs, out = (
            [p.run_dir for p in sweep.points if p.run_dir.is_dir()],
            sweep.root / "comparison",
        )
        if runs:
            print(compare.compare(runs, out, f"sweep {sweep.name}"), end="")
        failed = [o for o in outcomes if o.code != 0]
        for o in failed:
            print(f"failed: {o.point.name} (exit {o.code}): {o.last_error}")
        return failed[0].code if failed else 0

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
