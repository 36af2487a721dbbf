"""Where a run is: `TrainState` (epoch, step, the epoch's running totals), carried in every
checkpoint, and `EpochClock`, the one owner of the epoch's train time."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass


@dataclass
class TrainState:
    """Where the run is. The epoch totals are global over ranks, and carried in checkpoints so
    that an epoch interrupted and resumed reports the same numbers as one that was not."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_micro_steps: int = 0
    epoch_time: float = 0.0  # train seconds of the current epoch so far

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_micro_steps, self.epoch_time = 0.0, 0, 0.0


class EpochClock:
    """The train time of the current epoch, kept in `state.epoch_time`: it runs while steps
    run, and is paused around what is not training (saving, evaluating), so that a checkpoint
    holds the epoch's train time so far and a resumed epoch reports the whole epoch's speed."""

    def __init__(self, state: TrainState):
        self.state = state
        self.since: float | None = None

    def start(self) -> None:
        self.since = time.perf_counter()

    def pause(self) -> None:
        if self.since is not None:
            self.state.epoch_time += time.perf_counter() - self.since
            self.since = None
