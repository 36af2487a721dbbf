"""What a run reports: console lines, a progress bar, JSON-lines metrics, Weights & Biases.

Only the main rank gets a `Tracker`; every other rank gets a `NullTracker` whose methods do
nothing, so the training loop calls the tracker unconditionally and never checks its rank.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pipeline.dist import DistContext


class Progress:
    """A per-epoch progress line: redrawn in place on a terminal, a few plain lines otherwise."""

    def __init__(self, stream: TextIO, epoch: int, epochs: int, total: int):
        self.stream, self.total = stream, total
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.tty = stream.isatty()
        self.last_print = 0.0
        self.next_fraction = 0.25

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        fraction = step / self.total
        line = (
            f"{self.label} {step}/{self.total} [{int(fraction * 100):3d}%] loss {loss:.4f} "
            f"{images_per_s:,.0f} img/s"
        )
        now = time.monotonic()
        if self.tty:
            if now - self.last_print >= 0.1 or step == self.total:
                width = 24
                done = int(width * fraction)
                self.stream.write(
                    f"\r{self.label} |{'#' * done}{'.' * (width - done)}| "
                    f"{line[len(self.label) + 1 :]}\x1b[K"
                )
                self.stream.flush()
                self.last_print = now
        elif fraction >= self.next_fraction and step < self.total:
            # Logs of batch jobs get a line per quarter epoch, not one per step.
            self.stream.write(line + "\n")
            self.stream.flush()
            self.next_fraction = math.floor(fraction * 4 + 1) / 4

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class NullTracker:
    """The tracker of ranks that do not report."""

    run_id: str | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class Tracker:
    """Console, progress bar and JSON-lines files of the main rank; W&B when enabled."""

    def __init__(self, run_dir: Path, stream: TextIO = sys.stdout):
        self.run_dir, self.stream = run_dir, stream
        self.progress: Progress | None = None
        self.run_id: str | None = None

    def info(self, message: str) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    def warn(self, message: str) -> None:
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def start(
        self,
        config: dict,
        config_yaml: str,
        meta: dict,
        resumed: bool,
        global_step: int,
        epochs_done: int,
    ) -> None:
        """Print and save the resolved config; on resume, drop records past the checkpoint."""
        self.info("resolved config:\n  " + config_yaml.rstrip().replace("\n", "\n  "))
        (self.run_dir / "config.yaml").write_text(config_yaml)
        self._trim("metrics.jsonl", lambda r: resumed and r["epoch"] <= epochs_done)
        self._trim("steps.jsonl", lambda r: resumed and r["step"] <= global_step)

    def _trim(self, name: str, keep) -> None:
        """Rewrite a JSON-lines file with the records that `keep` accepts."""
        path = self.run_dir / name
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if keep(record):
                kept.append(line + "\n")
        path.write_text("".join(kept))

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress = Progress(self.stream, epoch, epochs, steps)

    def log_step(self, record: dict) -> None:
        """Step metrics at a logging interval: progress line and steps.jsonl."""
        if self.progress is not None:
            self.progress.update(record["step_in_epoch"], record["loss"], record["images_per_s"])
        self._append("steps.jsonl", record)

    def log_epoch(self, record: dict) -> None:
        """One record per epoch: the summary line and metrics.jsonl."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.info(
            f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  "
            f"test acc {record['test_accuracy'] * 100:.2f}%  "
            f"time {record['epoch_time_s']:.1f}s  {record['images_per_s']:,.0f} img/s"
        )
        self._append("metrics.jsonl", record)

    def finish(self, summary: dict) -> None:
        with open(self.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)


def make_tracker(ctx: DistContext, run_dir: Path) -> Tracker | NullTracker:
    return Tracker(run_dir) if ctx.is_main else NullTracker()
