"""Early stopping on two real gloo ranks: a run whose validation loss stops improving ends after
train.early_stop_patience epochs on every rank (no hang, exit 0), says why and which epoch it
selected, and is finished for good ("nothing to do"); a run interrupted after a non-improving
epoch and resumed stops at the epoch the uninterrupted one did, with the same selection.
The data is `split_data.write_misleading_mnist`: its validation loss is best after epoch 1.
(Selection in this process: tests/unit/test_selection.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from split_data import write_misleading_mnist

from pipeline.training import checkpoint

from helpers import TINY_ARGS, assert_ok, final_model, max_diff, run_pipeline

VAL, PATIENCE, STEPS_PER_EPOCH = 96, 2, 13  # 416 images kept, 13 steps of 32 per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_misleading_mnist(tmp_path_factory.mktemp("misleading"), VAL)


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY_ARGS,
        f"data.root={data}",
        f"train.run_dir={run_dir}",
        "train.epochs=10",
        f"data.val_size={VAL}",
        "checkpoint.select=val_loss",
        f"train.early_stop_patience={PATIENCE}",
        *extra,
    ]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("early") / "run"
    proc = run_pipeline(args(data, run_dir), nproc=2, timeout=300)
    assert_ok(proc)
    return run_dir, proc


def test_two_ranks_stop_together_after_patience_epochs(stopped):
    run_dir, proc = stopped
    s = summary(run_dir)
    assert s["stop_reason"] == "early_stop" and s["selected_epoch"] == 1
    assert s["epochs"] == s["selected_epoch"] + PATIENCE == 3
    assert s["epochs_without_improvement"] == PATIENCE
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert checkpoint.list_checkpoints(run_dir)[0].name == checkpoint.checkpoint_name(
        3 * STEPS_PER_EPOCH
    )
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(
        "stopped early after epoch 3: val_loss did not improve by more than 0 for 2 epoch(s); "
        "selected epoch 1 (val_loss "
    )
    assert proc.stdout.count("stopped early") == 1  # rank 0 reports, once
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr


def test_a_stopped_run_is_finished_for_good(data, stopped):
    run_dir, _ = stopped
    again = run_pipeline(args(data, run_dir), nproc=2, timeout=300)
    assert_ok(again)
    assert (
        f"nothing to do: the run in {run_dir} already finished (global step "
        f"{3 * STEPS_PER_EPOCH}, stopped early after epoch 3)" in again.stdout
    )
    assert "epoch 4" not in again.stdout


def test_a_resumed_run_stops_where_the_uninterrupted_one_did(data, stopped, tmp_path):
    straight, _ = stopped
    run_dir = tmp_path / "run"
    # Cut short two steps into epoch 3: epoch 2 was judged (no improvement), epoch 3 was not.
    first = run_pipeline(args(data, run_dir, f"train.max_steps={2 * STEPS_PER_EPOCH + 2}"), nproc=2)
    assert_ok(first)
    assert checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["selection"]["bad_epochs"] == 1
    resumed = run_pipeline(args(data, run_dir), nproc=2, timeout=300)
    assert_ok(resumed)
    assert "resumed from " in resumed.stdout and "stopped early after epoch 3" in resumed.stdout
    keys = ("stop_reason", "epochs", "global_step", "selected_epoch", "selected_value")
    assert {k: summary(run_dir)[k] for k in keys} == {k: summary(straight)[k] for k in keys}
    assert max_diff(final_model(run_dir), final_model(straight)) == 0
    best = [checkpoint.load(d / checkpoint.BEST)["model"] for d in (run_dir, straight)]
    assert max_diff(*best) == 0
