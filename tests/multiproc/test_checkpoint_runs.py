"""Checkpoints of real processes: a writer killed mid-write leaves the previous checkpoint intact;
training runs fall back from a corrupt newest checkpoint, refuse an incompatible one before
overwriting anything, and save what resume needs in files plain torch.load opens. (The file
format itself: tests/unit/test_checkpoint.py.)"""

import os
import signal
import subprocess
import sys
import time

import torch

from pipeline.errors import EXIT_CHECKPOINT
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import (
    REPO,
    TINY_ARGS,
    assert_ok,
    final_model,
    run_pipeline,
    same_state,
)

WRITER = """
import sys, torch
from pathlib import Path
from pipeline.training import checkpoint
run_dir = Path(sys.argv[1])
checkpoint.save(run_dir, 1, {"model": {"w": torch.ones(3)}}, keep=3)
print("first", flush=True)
checkpoint.save(run_dir, 2, {"model": {"w": torch.zeros(60_000_000)}}, keep=3)
print("second", flush=True)
"""


def test_kill_during_write_leaves_previous_checkpoint_intact(tmp_path):
    hit_mid_write = False
    for attempt in range(5):
        run_dir = tmp_path / f"a{attempt}"
        run_dir.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(run_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".ckpt-000000002") for p in run_dir.iterdir()):
                proc.send_signal(signal.SIGKILL)
                hit_mid_write = True
                break
            time.sleep(0.001)
        proc.wait()
        if not hit_mid_write:
            continue
        names = sorted(p.name for p in checkpoint.list_checkpoints(run_dir))
        assert names == ["ckpt-000000001.pt"]  # the half-written file is not a checkpoint
        newest = checkpoint.newest_valid(run_dir)
        assert torch.equal(checkpoint.load(newest)["model"]["w"], torch.ones(3))
        break
    assert hit_mid_write, "the writer was never caught in the middle of a write"


def _tiny(tiny_mnist, run_dir, *extra):
    return [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "checkpoint.every_steps=4",
        *extra,
    ]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=12")))
    newest = run_dir / checkpoint.checkpoint_name(12)
    data = bytearray(newest.read_bytes())
    # One flipped byte inside the model's largest tensor (fc1's weights, about a third of the
    # way in): the archive is still whole.
    data[len(data) // 3] ^= 0xFF
    newest.write_bytes(bytes(data))
    proc = run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=16"))
    assert_ok(proc)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "ckpt-000000012.pt is truncated or corrupt" in warning[0]
    assert f"resumed from {run_dir / checkpoint.checkpoint_name(8)}" in proc.stdout
    straight = tmp_path / "straight"
    assert_ok(run_pipeline(_tiny(tiny_mnist, straight, "train.max_steps=16")))
    a, b = final_model(run_dir), final_model(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_within_an_epoch_holds_the_epochs_train_time_so_far(tiny_mnist, tmp_path):
    """With the epoch's images so far: a run resumed from it reports the epoch's speed over
    the whole epoch, not the epoch's images over the resumed part's time."""
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=12")))
    at4, at8 = (checkpoint.load(run_dir / checkpoint.checkpoint_name(n)) for n in (4, 8))
    assert (at4["epoch_micro_steps"], at8["epoch_micro_steps"]) == (4, 8)
    assert 0 < at4["epoch_time"] < at8["epoch_time"], (at4["epoch_time"], at8["epoch_time"])


def test_incompatible_checkpoint_is_refused_before_anything_is_overwritten(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=8")))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for override, key in (
        ("model.kernel_size=3", "model.kernel_size"),
        ("optim.name=adam", "optim.name"),
        ("train.batch_size=64", "train.batch_size"),
        ("data.val_size=32", "data.val_size"),  # another validation split
    ):
        proc = run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=16", override))
        assert proc.returncode == EXIT_CHECKPOINT, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and key in errors[0] and "start a new run" in errors[0]
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_none_refuses_to_overwrite_an_earlier_run(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=4")))
    proc = run_pipeline(_tiny(tiny_mnist, run_dir, "train.resume=none"))
    assert proc.returncode == EXIT_CHECKPOINT
    assert "holds checkpoints of an earlier run" in proc.stderr
    missing = run_pipeline(_tiny(tiny_mnist, tmp_path / "r2", f"train.resume={tmp_path}/x.pt"))
    assert missing.returncode == EXIT_CHECKPOINT and "no such checkpoint file" in missing.stderr


def test_checkpoint_holds_what_resume_needs(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=6")))
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step_in_epoch",
        "global_step",
        "rng",
        "config",
        "world_size",
        "run_id",
        "torch_version",
        "git_revision",
    ):
        assert key in state
    assert (state["global_step"], state["step_in_epoch"], state["epoch"]) == (6, 6, 0)
    assert not any(k.startswith("module.") or "_orig_mod" in k for k in state["model"])
    assert state["config"]["train"]["max_steps"] == 6
    assert os.path.exists(run_dir / "config.yaml")


def test_a_checkpoint_opens_with_plain_torch_load(tiny_mnist, tmp_path):
    """No project code needed: torch.load(weights_only=True), and `model` fits a plain LeNet."""
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_tiny(tiny_mnist, run_dir, "train.max_steps=4")))
    path = checkpoint.list_checkpoints(run_dir)[0]
    state = torch.load(path, weights_only=True)
    model = LeNet()
    model.load_state_dict(state["model"])  # strict: every key, every shape
    assert state["global_step"] == 4 and state["config"]["model"]["kernel_size"] == 5
    assert all(v.is_contiguous() for v in state["model"].values())
    assert same_state(state, checkpoint.load(path))
