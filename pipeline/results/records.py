"""A run directory's records, read back: what `python -m pipeline.report` summarises and plots.

Training writes metrics.jsonl (one record per epoch), steps.jsonl (one record per logging
interval) and summary.json (once it finished). They are read from a finished run or one still
running: a last line cut short by a writer is skipped. `read_records` is the one reader of a run
directory, `percent` the one way an accuracy is printed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from pipeline.errors import DataError
from pipeline.tracking.jsonl import read_jsonl


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


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json (written once it finished); None where it is missing or unreadable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def read_records(run_dir: Path) -> RunRecords:
    """What `run_dir` holds, as far as it holds anything (a missing file has no records)."""
    files = [run_dir / "metrics.jsonl", run_dir / "steps.jsonl"]
    return RunRecords(
        run_dir=run_dir,
        epochs=_unique(read_jsonl(files[0]), "epoch"),
        steps=_unique(read_jsonl(files[1]), "step"),
        summary=read_summary(run_dir),
        last_write=max((f.stat().st_mtime for f in files if f.exists()), default=0.0),
    )


def load_run(run_dir: Path) -> RunRecords:
    """Read a run directory; DataError when it is missing or holds no metrics yet."""
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; pass the train.run_dir of a run")
    run = read_records(run_dir)
    if not run.epochs and not run.steps:
        raise DataError(
            f"no metrics in {run_dir} yet (metrics.jsonl and steps.jsonl are missing or empty); "
            "run the report again once training has logged its first steps"
        )
    return run


def _metric(epochs: list[dict]) -> str:
    """The key of the epochs' selection-split accuracy: val_accuracy, or test_accuracy in a run
    without a validation split."""
    return "val_accuracy" if any("val_accuracy" in r for r in epochs) else "test_accuracy"


def summarize(run: RunRecords) -> dict[str, Any]:
    """The numbers of the text summary: the selection and the test of the selected model from
    summary.json once the run finished; before that, the best epoch so far from the records."""
    epochs, steps, summary = run.epochs, run.steps, run.summary or {}
    last_step = max([r["step"] for r in epochs + steps], default=0)
    total_time = sum(r["epoch_time_s"] for r in epochs)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in epochs)
    finished = run.summary is not None and run.summary.get("global_step", -1) >= last_step
    metric = summary.get("selection_metric") or _metric(epochs)
    selected, value = summary.get("selected_epoch"), summary.get("selected_value")
    tested = ("test_accuracy", "test_loss", "test_of", "test_epoch")
    test = {k: summary.get(k) if finished else None for k in tested}
    if not finished and epochs:  # still running: the best epoch so far, by the records
        selected = epochs[-1]["best_epoch"]
        value = next(r for r in epochs if r["epoch"] == selected).get(metric)
    return {
        "epochs": epochs[-1]["epoch"] if epochs else 0,
        "global_step": last_step,
        "finished": finished,
        "stop_reason": summary.get("stop_reason") if finished else None,
        "selection_metric": metric,
        "selection_split": metric.partition("_")[0],
        "selected_epoch": selected,
        "selected_value": value,
        **test,
        "last_epoch": epochs[-1] if epochs else None,
        # THROUGHPUT: the intervals' median, as plotted; and all images over the epochs' train
        # time (evaluation excluded), the intervals' mean weighted by time, which the slowest
        # intervals (the first step's warm-up, a busy machine) pull below most of them.
        "median_images_per_s": median([r["images_per_s"] for r in steps]) if steps else None,
        "images_per_s": images / total_time if total_time > 0 else None,
        "train_time_s": total_time,
    }


# The throughput figures of `summarize`, in the words of summary.txt and throughput.png.
THROUGHPUT = (
    ("median_images_per_s", "median of the logging intervals"),
    ("images_per_s", "whole run (all images / train time)"),
)


def percent(value: float | None, missing: str = "n/a") -> str:
    """An accuracy (a fraction) as every command prints it: 0.98765 -> 98.77%."""
    return missing if value is None else f"{value * 100:.2f}%"


def metric_text(metric: str, value: float | None, missing: str = "n/a") -> str:
    """A selection metric's value as printed: an accuracy as a percentage, a loss to 4 places."""
    if value is None:
        return missing
    return percent(value) if metric.endswith("accuracy") else f"{value:.4f}"


def _last_epoch(r: dict | None) -> str:
    if r is None:
        return "n/a (no epoch finished yet)"
    split = "val" if "val_accuracy" in r else "test"
    text = f"{split} accuracy {percent(r[f'{split}_accuracy'])}, {split} loss "
    text += f"{r[f'{split}_loss']:.4f}"
    if "test_accuracy_this_epoch" in r:
        text += f"; test accuracy this epoch {percent(r['test_accuracy_this_epoch'])}"
    return text


def summary_text(run: RunRecords, s: dict[str, Any]) -> str:
    if s["finished"]:
        status = "finished"
        if s["stop_reason"] == "early_stop":
            status += f" (stopped early after epoch {s['epochs']})"
        elif s["stop_reason"] == "max_steps":
            status += " (at train.max_steps)"
    else:
        age = max(0.0, time.time() - run.last_write)
        status = (
            "not finished: still running, or stopped before the end "
            f"(last record written {age:.0f} s ago)"
        )
    metric = s["selection_metric"]
    if s["selected_epoch"] is None:
        selected = "n/a (no epoch finished yet)"
    else:
        shown = metric_text(metric, s["selected_value"], "n/a (no epoch finished yet)")
        selected = f"epoch {s['selected_epoch']} by {metric} ({shown})"
        if s["selection_split"] == "test":
            selected += ", on the test set: no validation split"
        if not s["finished"]:
            selected += " so far"
    if s["test_accuracy"] is None:
        tested = "n/a (the selected model is tested when the run ends)"
    else:
        tested = f"{percent(s['test_accuracy'])} (test loss {s['test_loss']:.4f}, "
        tested += f"of {s['test_of']})"
    throughput = "; ".join(f"{s[k]:,.0f} {words}" for k, words in THROUGHPUT if s[k] is not None)
    return "\n".join(
        [
            f"run:              {run.run_dir}",
            f"status:           {status}",
            f"epochs:           {s['epochs']} (global step {s['global_step']})",
            f"selected:         {selected}",
            f"test accuracy:    {tested}",
            f"last epoch:       {_last_epoch(s['last_epoch'])}",
            f"images/s:         {throughput or 'n/a'}",
            f"train time:       {s['train_time_s']:.1f} s (sum of epoch times)",
        ]
    )
