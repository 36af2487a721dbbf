"""Checkpoints of real processes: a writer killed (SIGKILL) in the middle of a checkpoint write
leaves the previous checkpoint intact and the half-written file is not taken for one;
checkpoint.every_seconds takes checkpoints by the clock at a step all ranks agree on. (The files
themselves, and training runs resuming from them: tests/unit/test_checkpoint.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch

from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, run_pipeline

# -- a writer killed mid-write --------------------------------------------------------------------


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


# -- checkpoints by the clock ---------------------------------------------------------------------


STEPS_PER_EPOCH = 16  # tiny_mnist: 512 images at a global batch of 32


def test_time_based_checkpoints_are_taken_at_agreed_steps_on_two_ranks(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "train.stop_check_every=4",
        "checkpoint.every_seconds=0.05",
        "checkpoint.every_epochs=100",  # epoch ends save only the last epoch
        "checkpoint.keep=1000",
    ]
    # 0.02 s a step: 0.08 s between the ranks' checks, longer than every_seconds on any machine.
    assert_ok(run_pipeline(args, nproc=2, faults=["--step-sleep", "0.02"]))
    steps = sorted(int(p.name[5:14]) for p in checkpoint.list_checkpoints(run_dir))
    last = 2 * STEPS_PER_EPOCH
    by_clock = [s for s in steps if s != last]
    # Some were taken by the clock, each at a step where the ranks compare notes, and each is
    # a whole, valid checkpoint (rank 0 wrote it while rank 1 waited at the same step).
    assert by_clock and steps[-1] == last, steps
    assert all(s % 4 == 0 for s in by_clock), steps
    for s in by_clock:
        assert checkpoint.load(run_dir / checkpoint.checkpoint_name(s))["global_step"] == s
