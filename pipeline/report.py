"""Plots and a text summary of a run directory, without W&B: `python -m pipeline.report RUN_DIR`.

Reads what training writes into its run directory (metrics.jsonl: one record per epoch,
steps.jsonl: one record per logging interval, summary.json once training finished) and writes
loss.png, accuracy.png, throughput.png and summary.txt (also printed). It works on a finished
run and on one still running: a last line cut short by a writer is skipped. Plotting needs
matplotlib, the `report` extra: `pip install -e .[report]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, PipelineError

PLOTS = ("loss.png", "accuracy.png", "throughput.png")


@dataclass
class RunRecords:
    """What a run directory holds, each list sorted by step and without repeats."""

    run_dir: Path
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    summary: dict | None = None
    last_write: float = 0.0  # modification time of the newest record file


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line that does not parse (cut short) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _unique(records: list[dict], key: str) -> list[dict]:
    """Sorted by `key`, the last record written winning where a key repeats."""
    by_key = {r[key]: r for r in records if isinstance(r.get(key), (int, float))}
    return [by_key[k] for k in sorted(by_key)]


def load_run(run_dir: Path) -> RunRecords:
    """Read a run directory; DataError when it is missing or holds no metrics yet."""
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; pass the train.run_dir of a run")
    files = [run_dir / "metrics.jsonl", run_dir / "steps.jsonl"]
    run = RunRecords(
        run_dir=run_dir,
        epochs=_unique(read_jsonl(files[0]), "epoch"),
        steps=_unique(read_jsonl(files[1]), "step"),
        last_write=max((f.stat().st_mtime for f in files if f.exists()), default=0.0),
    )
    if not run.epochs and not run.steps:
        raise DataError(
            f"no metrics in {run_dir} yet (metrics.jsonl and steps.jsonl are missing or empty); "
            "run the report again once training has logged its first steps"
        )
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        run.summary = summary if isinstance(summary, dict) else None
    except (OSError, json.JSONDecodeError):
        run.summary = None
    return run


def summarize(run: RunRecords) -> dict[str, Any]:
    """The numbers of the text summary, from the records alone."""
    epochs, steps = run.epochs, run.steps
    last_step = max([r["step"] for r in epochs + steps], default=0)
    total_time = sum(r["epoch_time_s"] for r in epochs)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in epochs)
    finished = run.summary is not None and run.summary.get("global_step", -1) >= last_step
    return {
        "epochs": epochs[-1]["epoch"] if epochs else 0,
        "global_step": last_step,
        "best_accuracy": max((r["test_accuracy"] for r in epochs), default=None),
        "final_accuracy": epochs[-1]["test_accuracy"] if epochs else None,
        # Over all epochs' training time: total images / total seconds.
        "mean_images_per_s": images / total_time if total_time > 0 else None,
        "train_time_s": total_time,
        "finished": finished,
    }


def _percent(value: float | None) -> str:
    return "n/a (no epoch finished yet)" if value is None else f"{value * 100:.2f}%"


def summary_text(run: RunRecords, s: dict[str, Any]) -> str:
    if s["finished"]:
        status = "finished"
    else:
        age = max(0.0, time.time() - run.last_write)
        status = (
            "not finished: still running, or stopped before the end "
            f"(last record written {age:.0f} s ago)"
        )
    throughput = "n/a" if s["mean_images_per_s"] is None else f"{s['mean_images_per_s']:,.0f}"
    return "\n".join(
        [
            f"run:              {run.run_dir}",
            f"status:           {status}",
            f"epochs:           {s['epochs']} (global step {s['global_step']})",
            f"best accuracy:    {_percent(s['best_accuracy'])}",
            f"final accuracy:   {_percent(s['final_accuracy'])}",
            f"mean images/s:    {throughput}",
            f"train time:       {s['train_time_s']:.1f} s (sum of epoch times)",
        ]
    )


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PipelineError(
            "the report needs matplotlib to draw its plots; pip install -e .[report]"
        ) from e
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _epoch_lines(ax, run: RunRecords) -> None:
    """Dotted vertical lines at the steps where epochs ended."""
    for r in run.epochs:
        ax.axvline(r["step"], color="0.8", linestyle=":", linewidth=1, zorder=0)


def plot(run: RunRecords, out: Path) -> list[Path]:
    """Write the PNG plots into `out`; returns the files written."""
    plt = _import_pyplot()
    out.mkdir(parents=True, exist_ok=True)
    title = run.run_dir.resolve().name
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    if run.steps or run.epochs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if run.steps:
            ax.plot(
                [r["step"] for r in run.steps],
                [r["loss"] for r in run.steps],
                label="train loss (per logging interval)",
                linewidth=1.2,
            )
        if run.epochs:
            x = [r["step"] for r in run.epochs]
            ax.plot(x, [r["train_loss"] for r in run.epochs], "o", label="train loss (epoch)")
            ax.plot(x, [r["test_loss"] for r in run.epochs], "s", label="test loss (epoch)")
        values = [r["loss"] for r in run.steps] + [r["test_loss"] for r in run.epochs]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        _epoch_lines(ax, run)
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"Loss - {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    if run.epochs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        epochs = [r["epoch"] for r in run.epochs]
        accuracy = [r["test_accuracy"] * 100 for r in run.epochs]
        ax.plot(epochs, accuracy, "o-", label="test accuracy")
        best = max(range(len(accuracy)), key=accuracy.__getitem__)
        ax.annotate(
            f"best {accuracy[best]:.2f}%",
            (epochs[best], accuracy[best]),
            textcoords="offset points",
            xytext=(0, -16),
            ha="right" if best == len(accuracy) - 1 and best > 0 else "center",
        )
        ax.set_xticks(epochs)
        ax.set_ylim(max(0.0, min(accuracy) - 2), 100.5)
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy - {title}")
        ax.grid(alpha=0.3)
        save(fig, "accuracy.png")

    if run.steps:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(
            [r["step"] for r in run.steps],
            [r["images_per_s"] for r in run.steps],
            label="per logging interval",
            linewidth=1.2,
        )
        mean = summarize(run)["mean_images_per_s"]
        if mean is not None:
            ax.axhline(mean, color="C1", linestyle="--", label=f"mean over epochs ({mean:,.0f})")
        _epoch_lines(ax, run)
        ax.set_ylim(bottom=0)
        ax.set(xlabel="optimizer step", ylabel="images/s", title=f"Training throughput - {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "throughput.png")
    return written


def report(run_dir: Path, out: Path | None = None) -> str:
    """Plots and summary.txt for `run_dir` into `out` (default RUN_DIR/report); the summary."""
    run = load_run(run_dir)
    out = out if out is not None else run_dir / "report"
    plot(run, out)
    text = summary_text(run, summarize(run))
    (out / "summary.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="Plots (loss, test accuracy, throughput) and a text summary of a run "
        "directory, finished or still running.",
    )
    parser.add_argument("run_dir", type=Path, help="the run's directory (train.run_dir)")
    parser.add_argument("--out", type=Path, help="where to write them (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        text = report(args.run_dir, args.out)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: cannot write the report: {e}; pass a writable --out DIR", file=sys.stderr)
        return 1
    print(text)
    print(f"plots and summary.txt in {args.out or args.run_dir / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
