"""Behaviour the README promises that no other test checked, on real training processes.

Ctrl-C ends a run with exit code 130; `train.resume=<path>` continues from a previous checkpoint
in another run directory and ends where the uninterrupted run ended; `checkpoint.every_epochs`
chooses the epochs that leave a checkpoint; the step and one-cycle schedules show in the logged
learning rate; and the same seed, world size and thread count give the same run bit for bit.
Everything goes through the command line or the public functions the other modules use, not
through the training loop's internals. (The schedules' values as built, in this process:
tests/unit/test_schedules.py.)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from pipeline.training import checkpoint

from helpers import TINY_ARGS, assert_ok, final_model, read_jsonl, run_pipeline

N_TRAIN = 512  # training images of the `tiny_mnist` fixture


def _args(tiny_mnist: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}", *extra]


def _rising(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def _assert_same_model(a_dir: Path, b_dir: Path) -> None:
    a, b = final_model(a_dir), final_model(b_dir)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters differ: {differ}"


# -- train.resume=<path> --------------------------------------------------------------------


def test_resume_from_an_older_checkpoint_of_another_run_dir(tiny_mnist, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "train.epochs=2",  # 16 steps of 32 images per epoch
        "optim.schedule=cosine",
        "optim.warmup_epochs=0.5",
        "checkpoint.every_steps=4",
        "checkpoint.keep=10",
    ]
    assert_ok(run_pipeline(_args(tiny_mnist, straight, *common)))
    every_4 = [checkpoint.checkpoint_name(s) for s in range(32, 0, -4)]
    assert [p.name for p in checkpoint.list_checkpoints(straight)] == every_4

    older = straight / checkpoint.checkpoint_name(12)  # mid-epoch 1, four checkpoints back
    proc = run_pipeline(_args(tiny_mnist, resumed, *common, f"train.resume={older}"))
    assert_ok(proc)
    assert f"resumed from {older} (epoch 1, step 12/16, global step 12)" in proc.stdout
    # It went on from step 12: its own checkpoints start at the next multiple of 4 after it,
    # and the run it came from is left as it was.
    assert [p.name for p in checkpoint.list_checkpoints(resumed)] == every_4[:5]
    assert [p.name for p in checkpoint.list_checkpoints(straight)] == every_4
    _assert_same_model(straight, resumed)
    keys = ("epoch", "step", "train_loss", "test_loss", "test_accuracy")
    want = [{k: r[k] for k in keys} for r in read_jsonl(straight / "metrics.jsonl")]
    got = [{k: r[k] for k in keys} for r in read_jsonl(resumed / "metrics.jsonl")]
    assert got == want


# -- checkpoint.every_epochs and the step schedule: one 3-epoch run --------------------------

BATCH = 128  # 4 steps per epoch on the tiny training set
STEP_LR, GAMMA, STEP_EPOCHS = 0.1, 0.5, 2


@pytest.fixture(scope="module")
def three_epochs(tiny_mnist, tmp_path_factory) -> Path:
    """3 epochs, a checkpoint every 2 epochs, lr 0.1 halved every 2 epochs, every step logged."""
    run_dir = tmp_path_factory.mktemp("three-epochs") / "run"
    args = _args(
        tiny_mnist,
        run_dir,
        "train.epochs=3",
        f"train.batch_size={BATCH}",
        "train.log_every=1",
        "checkpoint.every_epochs=2",
        "checkpoint.keep=10",
        f"optim.lr={STEP_LR}",
        "optim.schedule=step",
        f"optim.step_epochs={STEP_EPOCHS}",
        f"optim.gamma={GAMMA}",
    )
    assert_ok(run_pipeline(args))
    return run_dir


def test_every_epochs_checkpoints_after_epochs_2_and_3_only(three_epochs):
    per_epoch = N_TRAIN // BATCH
    epoch_end = {r["epoch"]: r["step"] for r in read_jsonl(three_epochs / "metrics.jsonl")}
    assert epoch_end == {1: per_epoch, 2: 2 * per_epoch, 3: 3 * per_epoch}
    names = [p.name for p in checkpoint.list_checkpoints(three_epochs)]
    # epoch 2 (every 2 epochs) and epoch 3 (the last epoch is always saved); not epoch 1
    assert names == [checkpoint.checkpoint_name(epoch_end[e]) for e in (3, 2)]


def test_step_schedule_multiplies_the_lr_by_gamma_every_step_epochs(three_epochs):
    per_epoch = N_TRAIN // BATCH
    steps = read_jsonl(three_epochs / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 3 * per_epoch + 1))
    # Inside an epoch the logged rate is the epoch's rate (whether a record shows the rate its
    # step used or the next step's: see test_logged_lr_is_the_rate_the_step_used).
    inside = {}
    for r in steps:
        if r["step_in_epoch"] < per_epoch:
            inside.setdefault(r["epoch"], []).append(r["lr"])
    want = {e: STEP_LR * GAMMA ** ((e - 1) // STEP_EPOCHS) for e in (1, 2, 3)}  # 0.1 0.1 0.05
    assert inside == {e: [pytest.approx(lr, rel=1e-12)] * (per_epoch - 1) for e, lr in want.items()}
    # metrics.jsonl shows the same rate as the epoch's last step record
    last = {r["epoch"]: r["lr"] for r in steps if r["step_in_epoch"] == per_epoch}
    assert {r["epoch"]: r["lr"] for r in read_jsonl(three_epochs / "metrics.jsonl")} == last


# -- the one-cycle schedule ------------------------------------------------------------------

CYCLE_LR, CYCLE_STEPS = 0.1, 2 * N_TRAIN // 32  # 2 epochs of 16 steps


@pytest.fixture(scope="module")
def one_cycle(tiny_mnist, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one-cycle") / "run"
    args = _args(
        tiny_mnist,
        run_dir,
        "train.epochs=2",
        "train.log_every=1",
        f"optim.lr={CYCLE_LR}",
        "optim.schedule=onecycle",
    )
    assert_ok(run_pipeline(args))
    return run_dir


def test_onecycle_lr_rises_to_optim_lr_then_falls(one_cycle):
    steps = read_jsonl(one_cycle / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, CYCLE_STEPS + 1))
    lrs = [r["lr"] for r in steps]
    peak, low = lrs.index(max(lrs)), lrs.index(min(lrs))
    assert max(lrs) == pytest.approx(CYCLE_LR, rel=1e-9)
    assert lrs[0] < CYCLE_LR / 5 and 0 < peak < CYCLE_STEPS // 2, lrs
    assert _rising(lrs[: peak + 1]), f"no steady rise: {lrs}"
    assert low >= CYCLE_STEPS - 2 and min(lrs) < CYCLE_LR * 1e-3, lrs
    assert _rising(lrs[peak : low + 1][::-1]), f"no steady fall: {lrs}"
    last = {r["epoch"]: r["lr"] for r in steps if r["step"] % (CYCLE_STEPS // 2) == 0}
    assert {r["epoch"]: r["lr"] for r in read_jsonl(one_cycle / "metrics.jsonl")} == last


def test_logged_lr_is_the_rate_the_step_used(three_epochs, one_cycle):
    per_epoch = N_TRAIN // BATCH
    epochs = {r["epoch"]: r["lr"] for r in read_jsonl(three_epochs / "metrics.jsonl")}
    # epoch 2 trained at 0.1 throughout; its record (and its last step's) say so
    assert epochs[2] == pytest.approx(STEP_LR), epochs
    boundary = [r for r in read_jsonl(three_epochs / "steps.jsonl") if r["step"] == 2 * per_epoch]
    assert boundary[0]["lr"] == pytest.approx(STEP_LR), boundary
    # a one-cycle run ends at its lowest rate
    lrs = [r["lr"] for r in read_jsonl(one_cycle / "steps.jsonl")]
    assert lrs[-1] == min(lrs), lrs[-3:]


# -- bit for bit: same seed, world size and threads per rank -------------------------------


def test_same_seed_world_and_threads_give_the_same_run_bit_for_bit(tiny_mnist, tmp_path):
    # Two threads per rank: the CPU kernels' reductions are split across threads, so the bits
    # depend on the thread count; with the same count they must not vary from run to run.
    two_threads = {"OMP_NUM_THREADS": "2"}
    first, second = tmp_path / "first", tmp_path / "second"
    for run_dir in (first, second):
        proc = run_pipeline(_args(tiny_mnist, run_dir, "train.epochs=2"), env=two_threads)
        assert_ok(proc)
        assert "cpu (2 threads per rank," in proc.stdout, proc.stdout[:500]
    _assert_same_model(first, second)
    keys = ("train_loss", "test_loss", "test_accuracy")
    assert [[r[k] for k in keys] for r in read_jsonl(first / "metrics.jsonl")] == [
        [r[k] for k in keys] for r in read_jsonl(second / "metrics.jsonl")
    ]
