"""tracking.tensorboard=true: the run's scalars as TensorBoard event files, read back with
TensorBoard's own reader, equal to metrics.jsonl and steps.jsonl, each step once, also after a
run killed between checkpoints and resumed (its second attempt logs those steps again)."""

from __future__ import annotations

import pytest

from helpers import TINY_ARGS, assert_ok, read_jsonl, require, run_pipeline


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files, as TensorBoard shows them."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        require("tensorboard is not installed (pip install tensorboard)")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_each_step_once_with_the_values_of_the_json_lines(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "train.log_every=2",
        "checkpoint.every_steps=4",
        "tracking.tensorboard=true",
    ]
    # Killed at step 11: steps 2-10 were logged, the newest checkpoint is of step 8.
    killed = run_pipeline(args, faults=["--fail-rank", "0", "--fail-step", "11"])
    assert killed.returncode == 17, killed.stderr
    assert read_jsonl(run_dir / "steps.jsonl")[-1]["step"] == 10
    resumed = run_pipeline(args)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "global step 8)" in resumed.stdout

    found = scalars(run_dir)
    steps, epochs = read_jsonl(run_dir / "steps.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert (
        [s for s, _ in found["train/loss"]] == [r["step"] for r in steps] == list(range(2, 33, 2))
    )
    for key in ("loss", "images_per_s", "lr"):
        got = [v for _, v in found[f"train/{key}"]]
        assert got == pytest.approx([r[key] for r in steps], rel=1e-6), key
    assert [s for s, _ in found["epoch/test_accuracy"]] == [16, 32]
    for key in ("train_loss", "test_loss", "test_accuracy", "lr"):
        got = [v for _, v in found[f"epoch/{key}"]]
        assert got == pytest.approx([r[key] for r in epochs], rel=1e-6), key
