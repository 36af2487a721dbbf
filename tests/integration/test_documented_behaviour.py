"""Behaviour the README promises that no other test checked, on real training runs.

`train.resume=<path>` continues from a previous checkpoint in another run directory and ends
where the uninterrupted run ended; `checkpoint.every_epochs` chooses the epochs that leave a
checkpoint; the logged learning rate is the one each step used (under the step and the one-cycle
schedule); and the same seed, world size and thread count give the same run bit for bit.
Everything goes through the command line or the public functions the other modules use, not
through the training loop's internals. (The schedules' values, step by step in this process:
tests/unit/test_engine.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.training import checkpoint

from helpers import TINY_ARGS, assert_ok, final_model, read_jsonl, run_pipeline, train_here

N_TRAIN = 512  # training images of the `tiny_mnist` fixture


def _args(tiny_mnist: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}", *extra]


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
    assert_ok(train_here(_args(tiny_mnist, straight, *common)))
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
    assert_ok(train_here(args))
    return run_dir


def test_every_epochs_checkpoints_after_epochs_2_and_3_only(three_epochs):
    per_epoch = N_TRAIN // BATCH
    epoch_end = {r["epoch"]: r["step"] for r in read_jsonl(three_epochs / "metrics.jsonl")}
    assert epoch_end == {1: per_epoch, 2: 2 * per_epoch, 3: 3 * per_epoch}
    names = [p.name for p in checkpoint.list_checkpoints(three_epochs)]
    # epoch 2 (every 2 epochs) and epoch 3 (the last epoch is always saved); not epoch 1
    assert names == [checkpoint.checkpoint_name(epoch_end[e]) for e in (3, 2)]


# -- the one-cycle schedule and bit for bit: the same seed, world size and threads per rank ---

CYCLE_LR, CYCLE_STEPS = 0.1, 2 * N_TRAIN // 32  # 2 epochs of 16 steps


@pytest.fixture(scope="module")
def one_cycle_twice(tiny_mnist, tmp_path_factory) -> tuple[Path, Path]:
    """The same 2-epoch one-cycle run twice, every step logged, two threads per rank: the CPU
    kernels' reductions are split across threads, so the bits depend on the thread count; with
    the same count they must not vary from run to run."""
    tmp = tmp_path_factory.mktemp("one-cycle")
    runs = (tmp / "first", tmp / "second")
    for run_dir in runs:
        args = _args(
            tiny_mnist,
            run_dir,
            "train.epochs=2",
            "train.log_every=1",
            f"optim.lr={CYCLE_LR}",
            "optim.schedule=onecycle",
        )
        proc = run_pipeline(args, env={"OMP_NUM_THREADS": "2"})
        assert_ok(proc)
        assert "cpu (2 threads per rank," in proc.stdout, proc.stdout[:500]
    return runs


def test_logged_lr_is_the_rate_the_step_used(three_epochs, one_cycle_twice):
    """Every step is logged with the rate it used, and each epoch with its last step's; the
    schedules' shapes are tests/unit/test_engine.py's."""
    per_epoch = N_TRAIN // BATCH
    steps = read_jsonl(three_epochs / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 3 * per_epoch + 1))
    # The step schedule: 0.1, 0.1, 0.05 by epoch, the last step of each epoch included (the
    # record of step 8 shows 0.1, the rate it used, not the 0.05 of the step after it).
    want = {e: STEP_LR * GAMMA ** ((e - 1) // STEP_EPOCHS) for e in (1, 2, 3)}
    assert [r["lr"] for r in steps] == [pytest.approx(want[r["epoch"]], rel=1e-12) for r in steps]
    last = {r["epoch"]: r["lr"] for r in steps if r["step_in_epoch"] == per_epoch}
    assert {r["epoch"]: r["lr"] for r in read_jsonl(three_epochs / "metrics.jsonl")} == last
    # One-cycle over the run's own length: from optim.lr / 25 up to optim.lr, and its last
    # step at torch's final rate, the lowest.
    first = one_cycle_twice[0]
    steps = read_jsonl(first / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, CYCLE_STEPS + 1))
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(CYCLE_LR / 25) and max(lrs) == pytest.approx(CYCLE_LR)
    assert lrs[-1] == min(lrs) == pytest.approx(CYCLE_LR / 25 / 1e4), lrs[-3:]
    last = {r["epoch"]: r["lr"] for r in steps if r["step"] % (CYCLE_STEPS // 2) == 0}
    assert {r["epoch"]: r["lr"] for r in read_jsonl(first / "metrics.jsonl")} == last


def test_same_seed_world_and_threads_give_the_same_run_bit_for_bit(one_cycle_twice):
    first, second = one_cycle_twice
    _assert_same_model(first, second)
    keys = ("train_loss", "test_loss", "test_accuracy")
    assert [[r[k] for k in keys] for r in read_jsonl(first / "metrics.jsonl")] == [
        [r[k] for k in keys] for r in read_jsonl(second / "metrics.jsonl")
    ]
