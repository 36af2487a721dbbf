"""Bad input ends in one clear line and a non-zero exit, never a traceback from every rank."""

import gzip
import shutil
import subprocess
import sys

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from pipeline.dist import launch
from pipeline.errors import EXIT_CONFIG, EXIT_DATA, EXIT_DISTRIBUTED

from helpers import REPO, TESTS, TINY_ARGS, child_env, run_pipeline


def _our_error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _check_one_line(proc, code, needle, nproc):
    assert proc.returncode != 0
    lines = _our_error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    if nproc == 1:
        assert proc.returncode == code
        assert "Traceback" not in proc.stderr
    else:
        # torchrun fails the job; no worker printed a Python traceback of ours.
        assert "ChildFailedError" in proc.stderr
        assert "pipeline/" not in proc.stderr.split("ChildFailedError")[0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_unknown_config_key(tiny_mnist, tmp_path, nproc):
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={tmp_path}", "optim.lrate=0.1"],
        nproc=nproc,
    )
    _check_one_line(proc, EXIT_CONFIG, "unknown config key optim.lrate", nproc)


@pytest.mark.parametrize("nproc", [1, 2])
def test_missing_data_directory(tmp_path, nproc):
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={tmp_path / 'nowhere'}", f"train.run_dir={tmp_path / 'run'}"],
        nproc=nproc,
    )
    _check_one_line(proc, EXIT_DATA, "train-images-idx3-ubyte", nproc)
    assert str(tmp_path / "nowhere") in _our_error_lines(proc.stderr)[0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_truncated_idx_file(tiny_mnist, tmp_path, nproc):
    root = tmp_path / "data"
    shutil.copytree(tiny_mnist, root)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={root}", f"train.run_dir={tmp_path / 'run'}"], nproc=nproc
    )
    _check_one_line(proc, EXIT_DATA, "train-images-idx3-ubyte", nproc)
    assert "truncated" in _our_error_lines(proc.stderr)[0]


def test_corrupt_gzip_names_the_file(tiny_mnist, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mnist, root)
    raw = root / "MNIST" / "raw"
    labels = raw / "t10k-labels-idx1-ubyte"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels.read_bytes())[:-12])
    labels.unlink()
    proc = run_pipeline([*TINY_ARGS, f"data.root={root}", f"train.run_dir={tmp_path / 'run'}"])
    _check_one_line(proc, EXIT_DATA, "t10k-labels-idx1-ubyte.gz", 1)


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


def test_the_cause_is_the_first_rank_with_its_own_error_else_the_first_killed(tmp_path):
    """torchrun's failures as it lists them (timestamps in whole seconds): a rank with its own
    error wins over a rank killed earlier or at the same time; among killed ranks, the first."""

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        f = ProcessFailure(rank, 1000 + rank, exitcode, str(tmp_path / f"none-{rank}.json"))
        f.timestamp = timestamp
        return f

    stopped, own = failure(0, -15, 100), failure(1, 3, 100)
    assert launch.job_cause({0: stopped, 1: own}) == (1, own)
    killed_first, own_later = failure(0, -9, 99), failure(1, 3, 101)
    assert launch.job_cause({0: killed_first, 1: own_later}) == (1, own_later)
    own_first, own_after = failure(0, 3, 101), failure(1, 6, 102)
    assert launch.job_cause({1: own_after, 0: own_first}) == (0, own_first)
    late, early = failure(0, -15, 101), failure(1, -9, 100)
    assert launch.job_cause({0: late, 1: early}) == (1, early)
