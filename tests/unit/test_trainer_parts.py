"""The Trainer's parts, in-process, without a process group or MNIST: the cadence after each step
(report, stop vote, saves by steps and by the clock), the epoch clock, the stop path, the loss
read-back and the epoch loop, driven with a fake engine and tracker."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteLossError, Stopped
from pipeline.training import trainer as trainer_module
from pipeline.training.stop import StopRequest
from pipeline.training.trainer import EpochClock, Trainer, TrainState


class FakeEngine:
    """Steps that take `step_s` seconds and lose `loss` per micro-step."""

    def __init__(self, loss: float = 1.0, step_s: float = 0.0):
        self.loss, self.step_s = loss, step_s
        self.first_step_s = None
        self.micro, self.batches = 0, []
        self.lr = 0.1

    def train_step(self, micro_batches) -> None:
        time.sleep(self.step_s)
        self.batches.append(micro_batches)
        self.micro += len(micro_batches)
        self.first_step_s = self.first_step_s or 0.001

    def read_loss(self) -> tuple[float, int]:
        micro, self.micro = self.micro, 0
        finite = micro if math.isfinite(self.loss) else 0
        return self.loss * micro, finite


class FakeTracker:
    def __init__(self):
        self.steps, self.epochs, self.run_id = [], [], None

    def log_step(self, record: dict) -> None:
        self.steps.append(record)

    def log_epoch(self, record: dict) -> None:
        self.epochs.append(record)

    def start_epoch(self, *args) -> None:
        pass


def make(overrides: list[str], steps_per_epoch: int = 16, **engine) -> Trainer:
    """A Trainer with its parts replaced by fakes: no data, no process group. `saves` and
    `votes` record what the cadence asked for; `vote_answer` is what the ranks agree on."""
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(None, ["train.log_every=4", "train.stop_check_every=5", *overrides])
    t.ctx = DistContext()
    t.state = TrainState()
    t.clock = EpochClock(t.state)
    t.stop = StopRequest(())
    t.steps_per_epoch = steps_per_epoch
    t.profiler = None
    t.engine = FakeEngine(**engine)
    t.tracker = FakeTracker()
    t.run_dir = "runs/test"
    t.pending, t.interval_started, t.saved_at = 0, time.perf_counter(), time.monotonic()
    t.saves, t.votes, t.vote_answer = [], [], (False, False)
    t.save = lambda: t.saves.append(t.state.global_step)

    def vote():
        t.votes.append(t.state.global_step)
        return t.vote_answer

    t.vote = vote
    t.batches = SimpleNamespace(
        epoch=lambda epoch, start=0: iter([(torch.zeros(1), torch.zeros(1))] * 1000)
    )
    return t


def drive(t: Trainer, steps: int) -> None:
    for _ in range(steps):
        t.step(iter([(None, None)] * t.cfg.train.grad_accum))
        t.after_step()


def test_the_cadence_reports_votes_and_saves_at_their_steps():
    t = make(["checkpoint.every_steps=6"])
    drive(t, 16)
    assert [r["step"] for r in t.tracker.steps] == [4, 6, 8, 12, 16]  # + before the save at 6
    assert t.votes == [5, 10, 15]
    assert t.saves == [6, 12]
    assert t.pending == 0


def test_a_save_by_the_clock_happens_at_the_step_the_ranks_voted_on():
    t = make([])
    t.vote_answer = (False, True)  # checkpoint.every_seconds passed on some rank
    drive(t, 11)
    assert t.saves == [5, 10] and t.votes == [5, 10]


@pytest.mark.parametrize(
    "signal, code", [("SIGTERM", EXIT_PREEMPTED), ("SIGINT", EXIT_INTERRUPTED)]
)
def test_a_stop_request_saves_and_ends_with_its_exit_code(monkeypatch, capsys, signal, code):
    monkeypatch.setattr(trainer_module.group, "barrier", lambda ctx: None)
    t = make([])
    t.stop.requested = signal
    t.vote_answer = (True, False)
    with pytest.raises(Stopped) as stopped:
        drive(t, 10)
    assert stopped.value.exit_code == code
    assert t.saves == [5] and t.state.global_step == 5
    what = "interrupted (Ctrl-C)" if signal == "SIGINT" else "stop requested (SIGTERM)"
    assert f"{what}: saved a checkpoint at step 5 in runs/test" in capsys.readouterr().out


def test_the_epoch_clock_leaves_out_the_saves():
    t = make(["checkpoint.every_steps=2"], step_s=0.01)

    def slow_save():
        time.sleep(0.2)
        t.saves.append(t.state.global_step)

    t.save = slow_save
    started = time.perf_counter()
    t.train_epoch()
    wall = time.perf_counter() - started
    assert t.saves == list(range(2, 17, 2))
    # 16 steps of 10 ms in the epoch's time; the 8 saves of 200 ms are not.
    assert 0.16 <= t.state.epoch_time < wall - 1.5, (t.state.epoch_time, wall)


def test_an_epoch_stops_at_max_steps_and_says_it_was_not_full():
    t = make(["train.max_steps=10"])
    assert t.train_epoch() is False
    assert t.state.global_step == 10 and t.finished()
    assert t.tracker.steps[-1]["step"] == 10  # the last steps are reported before it ends
    t = make([])
    assert t.train_epoch() is True and t.state.step_in_epoch == 16


def test_accumulation_takes_that_many_micro_batches_a_step():
    t = make(["train.grad_accum=4", "train.batch_size=64"])
    t.train_epoch()
    assert len(t.engine.batches) == 16 and all(len(b) == 4 for b in t.engine.batches)
    # The mean loss over all micro-steps, whatever their number.
    assert t.state.epoch_micro_steps == 64 and t.state.epoch_loss_sum == 64.0


def test_a_non_finite_loss_names_the_step():
    t = make([], loss=float("nan"))
    with pytest.raises(NonFiniteLossError, match="at or after step 1 "):
        drive(t, 4)
