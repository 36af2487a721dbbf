"""Ctrl-C on the suite leaves nothing behind (tests/conftest.py: ProcessCleanup): a pytest run
whose test trains 2 ranks under torchrun is interrupted as a terminal's Ctrl-C does it (SIGINT
to pytest's process group; the ranks, in sessions of their own, get none) while the ranks
train, and within 10 s no process it started is left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers import (
    REPO,
    TINY_ARGS,
    child_env,
    end_processes,
    processes_with,
    run_pipeline,
    wait_for_steps,
)

MARK = "LENET_CTRL_C_MARK"  # on every process the interrupted pytest starts, to find them
RUN_DIR = "LENET_CTRL_C_RUN_DIR"


def interrupted_training(tiny_mnist):
    """The test the interrupted pytest runs (collected there by its name, never here: it is no
    `test_`): 2 ranks under torchrun, a second a step, for minutes unless interrupted."""
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={os.environ[RUN_DIR]}"]
    slow = ["--step-sleep", "1"]
    run_pipeline([*args, "train.epochs=20", "train.log_every=1"], 2, timeout=300, faults=slow)


def marked(mark: str) -> set[int]:
    return set(processes_with(MARK, mark.__eq__))


def shown(pids: set[int]) -> str:
    """Each process's id and command line, for assertion messages."""
    lines = []
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            lines.append(f"{pid} {' '.join(argv.split(chr(0)))}")
    return "\n".join(lines)


def test_ctrl_c_during_a_two_rank_run_leaves_no_process(tmp_path):
    mark, run_dir, log = uuid.uuid4().hex, tmp_path / "run", tmp_path / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["-o", "python_functions=interrupted_training", __file__]
    env = child_env({MARK: mark, RUN_DIR: str(run_dir)})
    with open(log, "w") as out:
        interrupted = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        wait_for_steps(run_dir, interrupted, log, timeout=120)
        started = marked(mark)
        ranks = started & set(processes_with("LOCAL_RANK", lambda _: True))
        assert len(ranks) == 2 and len(started) >= 4, shown(started)  # pytest, agent, 2 ranks
        os.killpg(interrupted.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        while marked(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = marked(mark)
        assert not left, f"left 10 s after Ctrl-C:\n{shown(left)}\n{log.read_text()[-3000:]}"
        assert interrupted.wait(timeout=10) == 2, log.read_text()[-3000:]  # pytest: interrupted
    finally:
        end_processes(MARK, mark.__eq__, grace=0)
        interrupted.wait()
