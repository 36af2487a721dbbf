"""The interface of the places a run's metrics go (console and JSON lines, W&B, TensorBoard).

The tracker calls every sink's methods in turn; each method does nothing here, and a sink
overrides those it needs. A sink never stops training: what it cannot do is a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import Config


@dataclass
class RunStart:
    """What a sink is told when the run starts: the resolved config, the job's facts (`meta`,
    see `pipeline.tracking.header`), where a resume starts (global step, epochs done), the
    overrides line, the validation split and the W&B run id of the checkpoint."""

    cfg: Config
    meta: dict
    resumed: bool
    global_step: int
    epochs_done: int
    overrides: str = ""
    print_config: bool = False
    split: dict | None = None
    run_id: str | None = None


class Sink:
    """A place a run's metrics go (see the module's text)."""

    # The W&B run id, once the sink has one: the trainer keeps it in the checkpoints.
    run_id: str | None = None

    def start(self, run: RunStart) -> None:
        """The run starts, or resumes."""

    def start_epoch(self, epoch: int, epochs: int, steps: int, start: int) -> None:
        """Epoch `epoch` (from 0) of `epochs`, whose first `start` of `steps` steps were done
        before a resume."""

    def log_step(self, record: dict) -> None:
        """A step record: every train.log_every steps, and where an epoch ends, a checkpoint is
        saved or the run stops between two."""

    def log_epoch(self, record: dict) -> None:
        """The record of an epoch, after its evaluation."""

    def finish(self, summary: dict, line: str) -> None:
        """The run's summary and its last line; then the sink is closed."""
        self.close()

    def close(self, exit_code: int = 0) -> None:
        """Release what the sink holds; `exit_code` says how the run ended. Called again, it
        does nothing."""
