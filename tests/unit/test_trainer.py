"""The Trainer's parts, in-process, without a process group or MNIST: the cadence after each step
(report, stop vote, saves by steps and by the clock), the epoch clock, the stop path, the loss
read-back and the epoch loop, driven with the fakes of tests/fakes.py."""

from __future__ import annotations

import time

import pytest
from fakes import Agreement, FakeCheckpoints, FakeEngine, make_trainer

from pipeline.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteLossError, Stopped
from pipeline.training.trainer import Trainer


@pytest.fixture
def agreed(monkeypatch) -> Agreement:
    return Agreement.install(monkeypatch)


def make(agreed: Agreement, overrides: list[str], save_s: float = 0.0, **engine) -> Trainer:
    """A Trainer whose parts are fakes (tests/fakes.py), its votes recorded by `agreed` at the
    steps they happen."""
    t = make_trainer(
        ["train.log_every=4", "train.stop_check_every=5", *overrides],
        engine=FakeEngine(**engine),
        checkpoints=FakeCheckpoints(save_s=save_s),
    )
    agreed.state = t.state
    return t


def drive(t: Trainer, steps: int) -> None:
    for _ in range(steps):
        t.step(iter([(None, None)] * t.cfg.train.grad_accum))
        t.after_step()


def test_the_cadence_reports_votes_and_saves_at_their_steps(agreed):
    t = make(agreed, ["checkpoint.every_steps=6"])
    drive(t, 16)
    assert [r["step"] for r in t.tracker.steps] == [4, 6, 8, 12, 16]  # + before the save at 6
    assert agreed.steps == [5, 10, 15]
    assert t.checkpoints.saves == [6, 12]
    assert t.pending == 0


def test_a_save_by_the_clock_happens_at_the_step_the_ranks_voted_on(agreed):
    t = make(agreed, [])
    agreed.answer = (False, True)  # checkpoint.every_seconds passed on some rank
    drive(t, 11)
    assert t.checkpoints.saves == [5, 10] and agreed.steps == [5, 10]


@pytest.mark.parametrize(
    "signal, code", [("SIGTERM", EXIT_PREEMPTED), ("SIGINT", EXIT_INTERRUPTED)]
)
def test_a_stop_request_saves_and_ends_with_its_exit_code(agreed, capsys, signal, code):
    t = make(agreed, [])
    t.stop.requested = signal
    with pytest.raises(Stopped) as stopped:
        drive(t, 10)
    assert stopped.value.exit_code == code
    assert agreed.flags == [(True, False)]  # this rank asked to stop
    assert t.checkpoints.saves == [5] and t.state.global_step == 5
    what = "interrupted (Ctrl-C)" if signal == "SIGINT" else "stop requested (SIGTERM)"
    assert f"{what}: saved a checkpoint at step 5 in runs/test" in capsys.readouterr().out


def test_the_epoch_clock_leaves_out_the_saves(agreed):
    t = make(agreed, ["checkpoint.every_steps=2"], save_s=0.2, step_s=0.01)
    started = time.perf_counter()
    t.train_epoch()
    wall = time.perf_counter() - started
    assert t.checkpoints.saves == list(range(2, 17, 2))
    # 16 steps of 10 ms in the epoch's time; the 8 saves of 200 ms are not.
    assert 0.16 <= t.state.epoch_time < wall - 1.5, (t.state.epoch_time, wall)


def test_an_epoch_stops_at_max_steps_and_says_it_was_not_full(agreed):
    t = make(agreed, ["train.max_steps=10"])
    assert t.train_epoch() is False
    assert t.state.global_step == 10 and t.finished()
    assert t.tracker.steps[-1]["step"] == 10  # the last steps are reported before it ends
    t = make(agreed, [])
    assert t.train_epoch() is True and t.state.step_in_epoch == 16


def test_accumulation_takes_that_many_micro_batches_a_step(agreed):
    t = make(agreed, ["train.grad_accum=4", "train.batch_size=64"])
    t.train_epoch()
    assert len(t.engine.batches) == 16 and all(len(b) == 4 for b in t.engine.batches)
    # The mean loss over all micro-steps, whatever their number.
    assert t.state.epoch_micro_steps == 64 and t.state.epoch_loss_sum == 64.0


def test_a_non_finite_loss_names_the_step(agreed):
    t = make(agreed, [], loss=float("nan"))
    with pytest.raises(NonFiniteLossError, match="at or after step 1 "):
        drive(t, 4)
