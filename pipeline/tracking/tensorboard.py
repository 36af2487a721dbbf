"""The run's scalars as TensorBoard event files, for `tensorboard --logdir runs/` (rank 0 only).

With `tracking.tensorboard=true` the tracker writes what metrics.jsonl and steps.jsonl hold into
`RUN_DIR/tensorboard/`: per logging interval `train/loss`, `train/images_per_s` and `train/lr`,
per epoch the epoch record's numbers under `epoch/...`, each at its global step. A resumed run
appends to the same folder, and its first event tells TensorBoard to drop what the earlier
attempt logged after the checkpoint (`purge_step`), so every step is shown once, with the
values of the JSON lines. It needs the tensorboard package (the `tensorboard` extra); without it
the run warns once and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.tracking.sink import RunStart, Sink

log = logging.getLogger(__name__)

# Record fields that are not scalars to plot.
_SKIP = {"epoch", "step", "step_in_epoch", "time_s", "dataset", "test_count", "val_count"}


class TensorBoardSink(Sink):
    """The event files of RUN_DIR/tensorboard, from `start` (when tensorboard imports) on."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "tensorboard"
        self.writer = None

    def start(self, run: RunStart) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning(
                "TensorBoard logging is off: tensorboard is not installed (pip install "
                "tensorboard, the project's tensorboard extra); training goes on"
            )
            return
        # Steps up to the checkpoint's stay; what an earlier attempt logged after it goes.
        purge = run.global_step + 1 if run.global_step else None
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge)

    def log_step(self, record: dict) -> None:
        if self.writer is None:
            return
        for key in ("loss", "images_per_s", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def log_epoch(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in _SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, record["step"])
        self.writer.flush()

    def close(self, exit_code: int = 0) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
