"""The test suite itself, run as a user runs it: a missing prerequisite skips a test, with the
reason, for a user, and with CI=true fails the run, so that CI cannot pass by skipping (a real
pytest run of a test that needs the real MNIST, pointed at a directory that does not exist);
Ctrl-C on the suite leaves nothing behind (tests/conftest.py: ProcessCleanup): a pytest run whose
test trains 2 ranks under torchrun is interrupted as a terminal's Ctrl-C does it (SIGINT to
pytest's process group; the ranks, in sessions of their own, get none) while the ranks train, and
within 10 s no process it started is left, in one process and spread over two workers; a folder
of tests is spread over the cores and a file is not, each result under its file's name. (Where
the tests find the real MNIST: tests/unit/test_suite.py.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import (
    REPO,
    TINY_ARGS,
    child_env,
    end_processes,
    processes_with,
    run_pipeline,
    wait_for_steps,
)

# -- a missing prerequisite, and CI=true ----------------------------------------------------------


# Cheap: with no data it ends in the `mnist_root` fixture, before reading anything.
TARGET = "tests/integration/test_mnist.py::test_real_mnist"


def run_target(missing: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["MNIST_ROOT"] = str(missing)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra", TARGET],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def last_line(proc: subprocess.CompletedProcess) -> str:
    """pytest's summary: "1 skipped in 0.52s" and the like."""
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture
def missing(tmp_path: Path) -> Path:
    path = tmp_path.resolve() / "no-mnist-here"  # resolved, as the fixture reports it
    assert not path.exists()
    return path


def test_missing_mnist_fails_the_run_in_ci(missing: Path) -> None:
    proc = run_target(missing, ci=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output  # tests failed; not 0 (passed), 5 (none ran) or 2, 4
    assert last_line(proc).startswith("1 error in "), output  # the fixture's failure, only
    assert f"real MNIST not found at {missing}/MNIST/raw" in output, output
    assert "CI=true: this test must run, not skip" in output, output


def test_missing_mnist_skips_with_the_reason_for_a_user(missing: Path) -> None:
    proc = run_target(missing, ci=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert last_line(proc).startswith("1 skipped in "), output
    (reason,) = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert f"real MNIST not found at {missing}/MNIST/raw" in reason, output


# -- a folder spread over the cores ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target, spread", [("tests/unit", True), ("tests/unit/test_run_lock.py", False)]
)
def test_a_folder_is_spread_over_the_cores_and_a_file_is_not(target, spread):
    """tests/conftest.py: pytest_cmdline_main; the output names the file of each result. On one
    core a folder, too, runs in pytest's own process."""
    cores = len(os.sched_getaffinity(0))
    spread = spread and cores >= 2
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "test_run_lock", target]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = re.search(r"^created: (\d+)/\1 workers$", proc.stdout, re.M)
    assert bool(workers) == spread, proc.stdout
    if spread:
        assert int(workers.group(1)) == min(cores, 4), proc.stdout
    assert re.search(r"^tests/unit/test_run_lock\.py \.+ ", proc.stdout, re.M), proc.stdout


# -- Ctrl-C on the suite --------------------------------------------------------------------------


# pytest as a terminal runs it in the foreground, where Ctrl-C raises KeyboardInterrupt: also
# where this suite itself was started with SIGINT ignored (a shell's background job, nohup).
PYTEST_IN_A_TERMINAL = (
    "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.exit(pytest.main(sys.argv[1:]))"
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


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "two-workers"])
def test_ctrl_c_during_a_two_rank_run_leaves_no_process(tmp_path, workers):
    """In one pytest process, and spread over worker processes as a folder of tests is
    (tests/conftest.py: pytest_cmdline_main)."""
    mark, run_dir, log = uuid.uuid4().hex, tmp_path / "run", tmp_path / "pytest.log"
    cmd = [sys.executable, "-c", PYTEST_IN_A_TERMINAL, "-q", "-p", "no:cacheprovider", *workers]
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
