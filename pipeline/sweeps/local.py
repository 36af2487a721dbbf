"""A sweep's points on this machine: each a `python -m pipeline.train` process of its own, one or
`parallel` at a time (the CPU's cores split between them, unless OMP_NUM_THREADS is set), its
output in the sweep's logs/ folder and one line here when it starts, after each of its epochs, and
when it ends.

A point whose run directory holds a summary.json finished earlier and is skipped; one with
checkpoints but no summary resumes (the training command resumes by itself). A point that fails
is reported with its last error line and the others still run. Ctrl-C reaches every running
point, as in a terminal: each saves a checkpoint and stops, and the same command resumes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.results.records import metric_text, percent, read_summary
from pipeline.sweeps.spec import Point, Sweep
from pipeline.tracking.jsonl import read_jsonl


@dataclass
class Outcome:
    point: Point
    code: int  # the training command's exit code; 0 for a point finished earlier
    seconds: float = 0.0
    skipped: bool = False
    last_error: str = ""


def finished(point: Point) -> bool:
    return (point.run_dir / "summary.json").is_file()


def state(point: Point) -> str:
    """What the run directory of `point` holds: finished, started (resumes), or not started."""
    if finished(point):
        return "finished"
    if point.run_dir.is_dir() and any(point.run_dir.glob("ckpt-*.pt")):
        return "started (resumes)"
    return "not started"


def log_path(sweep: Sweep, point: Point) -> Path:
    return sweep.root / "logs" / f"{point.name}.log"


def _last_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[-1].strip()


def _result(point: Point) -> str:
    """The point's selection and its test, from its summary.json."""
    s = read_summary(point.run_dir) or {}
    metric, value, test = s.get("selection_metric"), s.get("selected_value"), s.get("test_accuracy")
    if metric is None or value is None or test is None:
        return ""
    shown = metric_text(metric, value)
    return f": {metric} {shown} (epoch {s.get('selected_epoch')}), test accuracy {percent(test)}"


def _epochs(point: Point) -> list[dict]:
    """The epoch records the point's run has written so far (metrics.jsonl: a line an epoch)."""
    return read_jsonl(point.run_dir / "metrics.jsonl")


def _epoch_result(record: dict) -> str:
    split = "val" if "val_accuracy" in record else "test"
    accuracy = percent(record.get(f"{split}_accuracy"))
    return f"epoch {record.get('epoch')}: {split} accuracy {accuracy}"


def run(
    sweep: Sweep,
    parallel: int = 1,
    quiet: bool = True,
    say: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run every point not finished yet, `parallel` at a time; an outcome per point."""
    n, todo, outcomes = len(sweep.points), [], {}
    for point in sweep.points:
        if finished(point):
            outcomes[point.index] = Outcome(point, 0, skipped=True)
        else:
            todo.append(point)
    if outcomes:
        say(f"{len(outcomes)} of {n} point(s) finished earlier: skipped")
    # The cores split between the points at a time, unless OMP_NUM_THREADS says otherwise.
    threads = max(1, (os.cpu_count() or 1) // max(1, min(parallel, len(todo) or 1)))
    env = {"OMP_NUM_THREADS": str(threads), **os.environ, "PYTHONUNBUFFERED": "1"}
    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    shown: dict[int, int] = {}  # epoch records said so far, by point
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < max(1, parallel):
                point = queue.pop(0)
                log = log_path(sweep, point)
                log.parent.mkdir(parents=True, exist_ok=True)
                out = open(log, "a")  # noqa: SIM115 - closed when the process ends
                argv = [sys.executable, "-m", "pipeline.train", *point.args]
                argv += ["-q"] if quiet else []
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
                running[point.index] = (proc, time.monotonic(), out)
                shown[point.index] = len(_epochs(point))  # a resumed point's earlier epochs
                verb = "resumes" if state(point).startswith("started") else "starts"
                say(f"[{point.index + 1}/{n}] {point.name} {verb} (log: {log})")
            for index, (proc, started, out) in list(running.items()):
                epochs = _epochs(sweep.points[index])
                for record in epochs[shown[index] :]:
                    say(f"[{index + 1}/{n}] {sweep.points[index].name} {_epoch_result(record)}")
                shown[index] = len(epochs)
                if proc.poll() is None:
                    continue
                out.close()
                point = sweep.points[index]
                seconds = time.monotonic() - started
                error = _last_error(log_path(sweep, point)) if proc.returncode else ""
                outcomes[index] = Outcome(point, proc.returncode, seconds, last_error=error)
                done = f"[{index + 1}/{n}] {point.name}"
                if proc.returncode == 0:
                    say(f"{done} finished in {seconds:.1f} s{_result(point)}")
                else:
                    say(f"{done} failed (exit {proc.returncode}): {error}")
                del running[index]
            time.sleep(0.1)
    except KeyboardInterrupt:
        # Ctrl-C reached the points too: each saves a checkpoint and exits; wait for them.
        for proc, _, out in running.values():
            proc.wait()
            out.close()
        raise
    return [outcomes[p.index] for p in sweep.points if p.index in outcomes]
