"""`python -m pipeline.report RUN_DIR` (`lenet-report`): plots (loss, test accuracy,
throughput) and a text summary of a run directory, finished or still running, without W&B. The
work is `pipeline.results`; plotting needs matplotlib (the project's `report` extra)."""

from __future__ import annotations

from pathlib import Path

from pipeline import cli
from pipeline.files import write_atomic
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
        "Plots (loss, test accuracy, throughput) and a text summary of a run directory, "
        "finished or still running.",
    )
    parser.add_argument("run_dir", type=Path, help="the run's directory (train.run_dir)")
    parser.add_argument("--out", type=Path, help="where to write them (default: RUN_DIR/report)")
    args = parser.parse_args(argv)

    def body() -> int:
        text = report(args.run_dir, args.out)
        print(text)
        print(f"plots and summary.txt in {args.out or args.run_dir / 'report'}")
        return 0

    return cli.run(body, verbose=cli.verbosity(args))


if __name__ == "__main__":
    raise SystemExit(main())
