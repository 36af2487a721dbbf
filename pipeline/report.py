"""`python -m pipeline.report RUN_DIR [RUN_DIR...]` (`lenet-report`): without W&B, a run's plots
(loss, accuracy, throughput) and a text summary, finished or still running; or, for several
run directories or a sweep's folder, the runs side by side (`pipeline.results.compare`): a table
(Markdown and CSV) and their curves overlaid. Plotting needs matplotlib (the `report` extra)."""

from __future__ import annotations

from pathlib import Path

from pipeline import cli
from pipeline.atomic import write_atomic
from pipeline.results import compare
from pipeline.results.plots import plot
from pipeline.results.records import load_run, summarize, summary_text


def report(run_dir: Path, out: Path | None = None) -> str:
    """Plots and summary.txt for `run_dir` into `out` (default RUN_DIR/report); the summary."""
    run = load_run(run_dir)
    out = out if out is not None else run_dir / "report"
    plot(run, out)
    text = summary_text(run, summarize(run))
    write_atomic(out / "summary.txt", text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(
        "pipeline.report",
        "Plots and a summary of a run directory, finished or still running; for several run "
        "directories (or a sweep's folder), a comparison of the runs.",
    )
    parser.add_argument(
        "run_dirs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (train.run_dir), or a folder of them (a sweep's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write (default: RUN_DIR/report for one run, FOLDER/comparison for a "
        "sweep's folder, runs/comparison for several runs)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        targets = args.run_dirs
        if len(targets) == 1 and (not targets[0].is_dir() or compare.is_run(targets[0])):
            print(report(targets[0], args.out))
            print(f"plots and summary.txt in {args.out or targets[0] / 'report'}")
            return 0
        out = args.out or (
            targets[0] / "comparison" if len(targets) == 1 else Path("runs/comparison")
        )
        print(compare.compare(targets, out), end="")
        return 0

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
