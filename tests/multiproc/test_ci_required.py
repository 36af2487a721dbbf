"""A missing prerequisite skips a test, with the reason, for a user; with CI=true it fails the
run, so that CI cannot pass by skipping. Checked on a real pytest run of a test that needs the
real MNIST, pointed at a directory that does not exist."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

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
