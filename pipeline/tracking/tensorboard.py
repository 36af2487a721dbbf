"""The run's scalars as TensorBoard event files, for `tensorboard --logdir runs/` (rank 0 only).

Wherever the tensorboard package is installed (`tracking.tensorboard=auto`, the default; `true`
insists on it, `false` turns it off) the tracker writes what metrics.jsonl and steps.jsonl hold
into `RUN_DIR/tensorboard/`: per logging interval `train/loss`, `train/images_per_s` and
`train/lr`, per epoch the epoch record's numbers under `epoch/...`, each at its global step. A
resumed run appends to the same folder, and its first event tells TensorBoard to drop what the
earlier attempt logged after the checkpoint (`purge_step`), so every step is shown once, with the
values of the JSON lines. Where the package is missing, `auto` neither imports nor warns, and
`true` is one error line (`enabled`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from pipeline.errors import ConfigError, describe
from pipeline.tracking.sink import RunStart, Sink

log = logging.getLogger(__name__)

# Record fields that are not scalars to plot.
_SKIP = {"epoch", "step", "step_in_epoch", "time_s", "dataset", "test_count", "val_count"}


def enabled(setting: str) -> bool:
    """Whether `tracking.tensorboard=setting` writes event files here: `auto` where the package
    is installed (looked up, not imported); ConfigError for `true` without it."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting == "true" and not installed:
        raise ConfigError(
            "tracking.tensorboard=true but the tensorboard package is not installed; pip install "
            "tensorboard (the project's tensorboard extra), or set tracking.tensorboard=auto"
        )
    return installed and setting != "false"


class TensorBoardSink(Sink):
    """The event files of RUN_DIR/tensorboard, from `start` (when tensorboard imports) on."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "tensorboard"
        self.writer = None

    def start(self, run: RunStart) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # installed, but it does not import
            log.warning(f"TensorBoard logging is off ({describe(e)}); training goes on")
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
