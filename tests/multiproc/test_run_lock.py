"""One job per run directory: a second job stops at once naming the holder; a dead holder's
lock is taken over with a line saying so; another attempt of the same job takes it silently."""

from __future__ import annotations

import signal

import pytest

from pipeline.errors import EXIT_RUN_DIR
from pipeline.training import lock

from helpers import TINY_ARGS, assert_ok, background_training, run_pipeline, wait_for_steps


def _args(root, run_dir, *extra):
    # Long enough to stop mid-run; a later job on the same directory ends after one step (or
    # at once, when the holder's checkpoint is past it).
    return [
        *TINY_ARGS,
        f"data.root={root}",
        f"train.run_dir={run_dir}",
        "train.epochs=100000",
        *extra,
    ]


@pytest.fixture
def holder(tiny_mnist, tmp_path):
    """A long run holding tmp_path/run; killed at the end of the test whatever happens."""
    run_dir, log = tmp_path / "run", tmp_path / "holder.log"
    args = _args(tiny_mnist, run_dir)
    with background_training(args, log, env={"TORCHELASTIC_RUN_ID": "a"}) as proc:
        wait_for_steps(run_dir, proc, log)
        yield run_dir, proc


def test_a_second_job_stops_at_once_naming_the_holder_who_once_dead_is_taken_over(
    tiny_mnist, holder
):
    run_dir, proc = holder
    # The holder paused (it keeps its lock), so that the directory changes only if the second
    # job changes it.
    proc.send_signal(signal.SIGSTOP)
    try:
        before = _listing(run_dir)
        second = run_pipeline(_args(tiny_mnist, run_dir, "train.max_steps=1"), timeout=120)
        after = _listing(run_dir)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.returncode == EXIT_RUN_DIR, second.stderr[-2000:]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith("error: run directory") and f"pid {proc.pid}" in line
    assert "torchrun run a" in line and "train.run_dir" in line
    assert after == before  # the second job wrote, replaced and removed nothing there
    assert proc.poll() is None  # the holder trains on
    # The holder dies without releasing its lock: the next job takes it over, saying so.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run_pipeline(_args(tiny_mnist, run_dir, "train.max_steps=1"), timeout=300)
    assert_ok(again)
    assert "took over the lock" in again.stdout and f"pid {proc.pid}" in again.stdout
    assert not (run_dir / lock.OWNER).exists()  # released at the end


def _listing(run_dir) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.iterdir()}


def test_another_attempt_of_the_same_job_takes_its_lock_back_silently(tiny_mnist, holder):
    run_dir, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run_pipeline(
        _args(tiny_mnist, run_dir, "train.max_steps=1"), env={"TORCHELASTIC_RUN_ID": "a"}
    )
    assert_ok(again)
    assert "took over" not in again.stdout


def test_a_run_dir_that_cannot_be_created_ends_in_one_line(tiny_mnist, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_pipeline(_args(tiny_mnist, blocker / "run"), timeout=120)
    assert proc.returncode == EXIT_RUN_DIR, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert str(blocker / "run") in line and "Traceback" not in proc.stderr
