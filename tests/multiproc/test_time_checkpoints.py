"""checkpoint.every_seconds: checkpoints by the clock, at a step all ranks agree on."""

from __future__ import annotations

from pipeline.training import checkpoint

from helpers import TINY_ARGS, assert_ok, run_pipeline

STEPS_PER_EPOCH = 16  # tiny_mnist: 512 images at a global batch of 32


def test_time_based_checkpoints_are_taken_at_agreed_steps_on_two_ranks(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=8",
        "train.stop_check_every=4",
        "checkpoint.every_seconds=0.05",
        "checkpoint.every_epochs=100",  # epoch ends save only the last epoch
        "checkpoint.keep=1000",
    ]
    assert_ok(run_pipeline(args, nproc=2))
    steps = sorted(int(p.name[5:14]) for p in checkpoint.list_checkpoints(run_dir))
    last = 8 * STEPS_PER_EPOCH
    by_clock = [s for s in steps if s != last]
    # Some were taken by the clock, each at a step where the ranks compare notes, and each is
    # a whole, valid checkpoint (rank 0 wrote it while rank 1 waited at the same step).
    assert by_clock and steps[-1] == last, steps
    assert all(s % 4 == 0 for s in by_clock), steps
    for s in by_clock:
        assert checkpoint.load(run_dir / checkpoint.checkpoint_name(s))["global_step"] == s


def test_without_every_seconds_only_the_configured_checkpoints_are_taken(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=3",
        "train.stop_check_every=4",
        "checkpoint.keep=1000",
    ]
    assert_ok(run_pipeline(args, nproc=1))
    steps = sorted(int(p.name[5:14]) for p in checkpoint.list_checkpoints(run_dir))
    assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
