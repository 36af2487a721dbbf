"""A run directory's records, read back: what `python -m pipeline.report` summarises and plots.

Training writes metrics.jsonl (one record per epoch), steps.jsonl (one record per logging
interval) and summary.json (once it finished). They are read from a finished run or one still
running: a last line cut short by a writer is skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.files import read_jsonl


@dataclass
class RunRecords:
    """What a run directory holds, each list sorted by step and without repeats."""

    run_dir: Path
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    summary: dict | None = None
    last_write: float = 0.0  # modification time of the newest record file


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
