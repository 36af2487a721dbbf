"""Every command as a user starts it (`python -m pipeline.NAME`): `--version` and `--help` name
the program as called, and a closed pipe ends without a traceback; bad input to a job of 2 ranks
(under torchrun, or started with --nproc-per-node) ends in one clear line and a non-zero exit,
never a traceback from every rank. (One process, called in the test's own:
tests/unit/test_commands.py; the keys `--help` lists: tests/unit/test_config.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pipeline import __version__
from pipeline.config.schema import Config, to_dict
from pipeline.errors import EXIT_CONFIG, EXIT_DATA, EXIT_DISTRIBUTED
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import REPO, TESTS, TINY_ARGS, child_env, run_pipeline

# -- the commands as processes: --version, --help, a closed pipe ----------------------------------


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


# -- bad input to a job of 2 ranks ----------------------------------------------------------------


def _our_error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _check_one_line(proc, needle):
    """One line of ours from the 2 ranks' job; torchrun fails the job, and no worker printed a
    Python traceback of ours."""
    assert proc.returncode != 0
    lines = _our_error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "ChildFailedError" in proc.stderr
    assert "pipeline/" not in proc.stderr.split("ChildFailedError")[0]


def test_unknown_config_key(tiny_mnist, tmp_path):
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={tmp_path}", "optim.lrate=0.1"],
        nproc=2,
    )
    _check_one_line(proc, "unknown config key optim.lrate")


def test_missing_data_directory(tmp_path):
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={tmp_path / 'nowhere'}", f"train.run_dir={tmp_path / 'run'}"],
        nproc=2,
    )
    _check_one_line(proc, "train-images-idx3-ubyte")
    assert str(tmp_path / "nowhere") in _our_error_lines(proc.stderr)[0]


def test_truncated_idx_file(tiny_mnist, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mnist, root)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={root}", f"train.run_dir={tmp_path / 'run'}"], nproc=2
    )
    _check_one_line(proc, "train-images-idx3-ubyte")
    assert "truncated" in _our_error_lines(proc.stderr)[0]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrate=0.1", "unknown config key optim.lrate"),
        ("train.batch_size=63", "63 cannot be split across 2 rank(s)"),
    ],
)
def test_nproc_per_node_reports_a_config_error_once_before_any_rank_starts(
    tiny_mnist, tmp_path, override, needle
):
    run_dir = tmp_path / "run"
    proc = run_pipeline(
        [
            "--nproc-per-node=2",
            *TINY_ARGS,
            f"data.root={tiny_mnist}",
            f"train.run_dir={run_dir}",
            override,
        ]
    )
    assert proc.returncode == EXIT_CONFIG
    assert proc.stderr.strip().splitlines() == _our_error_lines(proc.stderr), proc.stderr
    (line,) = _our_error_lines(proc.stderr)
    assert needle in line and proc.stdout == "" and not run_dir.exists()


def test_nproc_per_node_reports_a_rank_error_once(tmp_path):
    proc = run_pipeline(
        [
            "--nproc-per-node=2",
            *TINY_ARGS,
            f"data.root={tmp_path / 'nowhere'}",
            f"train.run_dir={tmp_path / 'run'}",
        ]
    )
    assert proc.returncode == EXIT_DATA
    (line,) = _our_error_lines(proc.stderr)
    assert "train-images-idx3-ubyte" in line
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("order", ["error-first", "signal-first"])
def test_nproc_per_node_reports_the_rank_that_failed_on_its_own(order):
    """Whichever failure torchrun lists first, the rank torchrun stopped or killed or the rank
    with an error of its own, the job ends with the latter's exit code and line
    (tests/rank_race.py makes each order happen)."""
    proc = subprocess.run(
        [sys.executable, str(TESTS / "rank_race.py"), order],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_DISTRIBUTED, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert lines == ["[rank 1] error: rank 1 failed on its own"], proc.stderr
