"""Fakes of the Trainer's parts, for in-process tests of its loop: no process group, no data, no
files. `make_trainer` gives them to `pipeline.training.trainer.Trainer` through its constructor;
`Agreement.install` stands in for the ranks' votes (`group.any_rank`) and barriers."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from pipeline.config.schema import load_config
from pipeline.data.sets import RunData
from pipeline.dist import group
from pipeline.dist.group import DistContext
from pipeline.training.selection import Selection
from pipeline.training.stop import StopRequest
from pipeline.training.trainer import Trainer, TrainState


class FakeEngine:
    """Steps that take `step_s` seconds and lose `loss` per micro-step; `batches` holds each
    step's micro-batches."""

    def __init__(self, loss: float = 1.0, step_s: float = 0.0):
        self.loss, self.step_s = loss, step_s
        self.first_step_s, self.micro, self.batches, self.lr = None, 0, [], 0.1
        self.model = torch.nn.Linear(1, 1)

    def train_step(self, micro_batches) -> None:
        time.sleep(self.step_s)
        self.batches.append(micro_batches)
        self.micro += len(micro_batches)
        self.first_step_s = self.first_step_s or 0.001

    def read_loss(self) -> tuple[float, int]:
        micro, self.micro = self.micro, 0
        finite = micro if math.isfinite(self.loss) else 0
        return self.loss * micro, finite

    def state_dict(self) -> dict:
        return {}


class FakeBatches:
    """Every epoch, as many micro-batches as the Trainer takes."""

    def epoch(self, epoch: int, start: int = 0):
        return itertools.repeat((torch.zeros(1), torch.zeros(1)))


class FakeEvals:
    """An epoch's evaluation gives the next scripted validation accuracy (and loss 1 - it);
    `tests` counts the test set's evaluations."""

    has_val = True

    def __init__(self, accuracies: list[float] = ()):
        self.accuracies, self.epochs, self.tests = list(accuracies), 0, 0

    def epoch(self, engine) -> dict:
        value = self.accuracies[self.epochs]
        self.epochs += 1
        return {"val_loss": 1 - value, "val_accuracy": value, "val_count": 100}

    def test(self, engine) -> dict:
        self.tests += 1
        return {"test_loss": 0.25, "test_accuracy": 0.75, "test_count": 100}


class FakeTracker:
    """Keeps what the Trainer reports: step and epoch records, the summary and its last line."""

    def __init__(self):
        self.steps, self.epochs, self.run_id, self.summary, self.line = [], [], None, None, None

    def start(self, *args, **kwargs) -> None:
        pass

    def start_epoch(self, *args) -> None:
        pass

    def log_step(self, record: dict) -> None:
        self.steps.append(record)

    def log_epoch(self, record: dict) -> None:
        self.epochs.append(record)

    def finish(self, summary: dict, line: str = "") -> None:
        self.summary, self.line = summary, line


class FakeCheckpoints:
    """The global steps of the checkpoints the Trainer asked for: `saves` (ckpt-*.pt) and
    `best_saves` (best.pt), each taking `save_s` seconds; no best.pt to read back."""

    def __init__(self, save_s: float = 0.0):
        self.save_s, self.saves, self.best_saves = save_s, [], []

    def save(self, step: int, state: dict, best: dict | None = None) -> None:
        time.sleep(self.save_s)
        (self.saves if best is None else self.best_saves).append(step)

    def load_best(self) -> dict | None:
        return None


class Agreement:
    """The ranks' votes (`group.any_rank`) and barriers of a world of one, without a process
    group. Each vote's flags are kept in `flags`, with the global step of `state` (where a test
    gives one) in `steps`, and answered with `answer` where a test sets one (what the other
    ranks made of it), else as given."""

    def __init__(self):
        self.flags, self.steps, self.answer = [], [], None
        self.state: TrainState | None = None

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch) -> Agreement:
        agreement = cls()
        monkeypatch.setattr(group, "any_rank", agreement.any_rank)
        monkeypatch.setattr(group, "barrier", lambda ctx: None)
        return agreement

    def any_rank(self, ctx: DistContext, *flags: bool) -> tuple[bool, ...]:
        self.flags.append(flags)
        if self.state is not None:
            self.steps.append(self.state.global_step)
        return self.answer or flags


def make_trainer(
    overrides: list[str],
    steps_per_epoch: int = 16,
    engine: FakeEngine | None = None,
    evals: FakeEvals | None = None,
    checkpoints: FakeCheckpoints | None = None,
) -> Trainer:
    """A Trainer of the config `overrides` give (its run directory runs/test) whose parts are
    fakes; the real `Selection` and `TrainState`."""
    cfg = load_config(None, ["train.run_dir=runs/test", *overrides])
    data = RunData(FakeBatches(), evals or FakeEvals(), steps_per_epoch, {})
    return Trainer(
        cfg,
        DistContext(),
        engine or FakeEngine(),
        data,
        FakeTracker(),
        checkpoints or FakeCheckpoints(),
        Selection.from_config(cfg),
        StopRequest(()),
    )
