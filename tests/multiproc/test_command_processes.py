"""Every command as a user starts it (`python -m pipeline.NAME`): `--version` and `--help` name
the program as called, and a closed pipe ends without a traceback. (Exit codes and error lines:
tests/unit/test_commands.py; the keys `--help` lists: tests/unit/test_config.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import __version__
from pipeline.config.schema import Config, to_dict
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import REPO, child_env


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a checkpoint of an untrained LeNet, and its metrics."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = {"model": LeNet().state_dict(), "config": to_dict(Config()), "global_step": 1}
    checkpoint.save(run_dir, 1, state, keep=3)
    (run_dir / "steps.jsonl").write_text(
        '{"step": 1, "epoch": 1, "loss": 2.3, "lr": 0.1, '
        + '"images_per_s": 100.0, "step_in_epoch": 1}\n'
    )
    return run_dir


@pytest.mark.parametrize("name", ["train", "evaluate", "export", "predict", "report", "bench"])
def test_version_and_help_name_the_program_as_called(name):
    module = f"pipeline.{name}"
    for argv, expected in (
        (["--version"], f"python -m {module} (lenet-ddp) {__version__}"),
        (
            ["--help"],
            f"usage: python -m {module}",
        ),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", module, *argv],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(expected), proc.stdout[:300]


def test_a_closed_pipe_ends_quietly(run_dir):
    """`python -m pipeline.report RUN_DIR | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.run(
        f"{sys.executable} -m pipeline.report {run_dir} --out {run_dir}/r | head -c 1",
        shell=True,
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
