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

from pathlib import Path

# Record fields that are not scalars to plot.
_SKIP = {"epoch", "step", "step_in_epoch", "time_s", "dataset", "test_count", "val_count"}


class TensorBoardMissing(Exception):
    """tensorboard cannot be imported; the message says what to install."""


class EventFiles:
    def __init__(self, run_dir: Path, global_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TensorBoardMissing(
                "tensorboard is not installed (pip install tensorboard, the project's "
                "tensorboard extra)"
            ) from e
        self.dir = run_dir / "tensorboard"
        # Steps up to the checkpoint's stay; what an earlier attempt logged after it goes.
        purge = global_step + 1 if global_step else None
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge)

    def log_step(self, record: dict) -> None:
        step = record["step"]
        for key in ("loss", "images_per_s", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], step)

    def log_epoch(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key not in _SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
