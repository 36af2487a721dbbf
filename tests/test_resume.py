"""Exact resume and surviving faults, on real processes (gloo on CPU)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pipeline import checkpoint
from pipeline.errors import EXIT_DISTRIBUTED, EXIT_NONFINITE, EXIT_PREEMPTED

from conftest import REPO, TINY_ARGS, assert_ok, final_model, run_pipeline


def _args(tiny_mnist, run_dir, *extra):
    return [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "optim.schedule=cosine",
        "optim.warmup_epochs=0.5",
        "checkpoint.every_steps=5",
        *extra,
    ]


def _assert_same(a_dir, b_dir):
    a, b = final_model(a_dir), final_model(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("nproc", [1, 2])
def test_stop_and_resume_is_bitwise_identical(tiny_mnist, tmp_path, nproc):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(run_pipeline(_args(tiny_mnist, straight), nproc=nproc))
    # Stop mid-epoch 1 at step 11 (one after a periodic checkpoint), then run to the end.
    assert_ok(run_pipeline(_args(tiny_mnist, resumed, "train.max_steps=11"), nproc=nproc))
    proc = run_pipeline(_args(tiny_mnist, resumed), nproc=nproc)
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "global step 11" in proc.stdout
    _assert_same(straight, resumed)
    # Same seed and world size, same run: the uninterrupted run is reproducible too.
    again = tmp_path / "again"
    assert_ok(run_pipeline(_args(tiny_mnist, again), nproc=nproc))
    _assert_same(straight, again)


def test_rank_killed_under_torchrun_restarts_and_resumes(tiny_mnist, tmp_path):
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    assert_ok(run_pipeline(_args(tiny_mnist, straight), nproc=2))
    proc = run_pipeline(
        _args(tiny_mnist, faulty, "debug.fail_rank=1", "debug.fail_step=13"),
        nproc=2,
        extra_launcher_args=["--max-restarts=1"],
        timeout=240,
    )
    assert_ok(proc)
    assert "debug: rank 1 exits at step 13" in proc.stderr
    assert f"resumed from {faulty / checkpoint.checkpoint_name(10)}" in proc.stdout
    _assert_same(straight, faulty)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(args, world=2):
    """Start `world` training processes the way srun or torchrun's workers see the world."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.train", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait_for_training(run_dir, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = run_dir / "steps.jsonl"
        if steps.exists() and steps.read_text().count("\n") >= 2:
            return
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    pytest.fail("training did not start")


def test_sigterm_saves_exits_with_the_documented_code_and_rerun_completes(tiny_mnist, tmp_path):
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    args = _args(tiny_mnist, run_dir, "train.epochs=40", "checkpoint.every_steps=0")
    procs = _spawn_ranks(args)
    _wait_for_training(run_dir, procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, outs
    assert "stop requested (SIGTERM): saved a checkpoint at step" in outs[0][0]
    saved = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])
    assert 0 < saved["global_step"] < 40 * 16
    procs = _spawn_ranks(args)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"global step {saved['global_step']})" in outs[0][0]
    straight_procs = _spawn_ranks(
        _args(tiny_mnist, straight, "train.epochs=40", "checkpoint.every_steps=0")
    )
    assert [p.wait(timeout=300) for p in straight_procs] == [0, 0]
    _assert_same(straight, run_dir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_pipeline(
        _args(
            tiny_mnist,
            run_dir,
            "optim.lr=1e6",
            "optim.schedule=none",
            "optim.warmup_epochs=0",
            "checkpoint.every_steps=1",
        )
    )
    assert proc.returncode == EXIT_NONFINITE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite at or after step" in errors[0], proc.stderr
    found = checkpoint.list_checkpoints(run_dir)
    assert found, "the checkpoints written before the loss diverged are kept"
    for path in found:
        state = checkpoint.load(path)["model"]
        assert all(torch.isfinite(t).all() for t in state.values()), path
    step = int(errors[0].split("at or after step ")[1].split()[0])
    assert checkpoint.load(found[0])["global_step"] < step


def test_a_hanging_peer_ends_the_job_after_the_collective_timeout(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    procs = _spawn_ranks(
        _args(
            tiny_mnist, run_dir, "train.epochs=200", "dist.timeout_s=5", "checkpoint.every_steps=0"
        )
    )
    try:
        _wait_for_training(run_dir, procs)
        procs[1].send_signal(signal.SIGSTOP)  # rank 1 hangs
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode == EXIT_DISTRIBUTED, err
        assert time.monotonic() - started < 60
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "rank 0" in errors[0], err
    finally:
        procs[1].kill()
        procs[1].wait()
