"""A run directory that cannot be written, fills up, or disappears: one line naming the path and
the OS error, exit 7, the checkpoints already written intact and no temporary file left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.errors import EXIT_RUN_DIR

from helpers import REPO, TINY_ARGS, background_training, run_pipeline, wait_for_steps


def _args(root, run_dir, *extra):
    return [*TINY_ARGS, f"data.root={root}", f"train.run_dir={run_dir}", *extra]


def _one_error_line(proc) -> str:
    assert proc.returncode == EXIT_RUN_DIR, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    return line


def _leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (in KiB), mounted for the test and unmounted after it."""
    mounted = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"mounting a small tmpfs was refused here ({proc.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_no_space_for_a_checkpoint(tiny_mnist, small_disk):
    # Room for the run's small files and one checkpoint (about 500 KB), not for a second.
    run_dir = small_disk(800) / "run"
    proc = run_pipeline(_args(tiny_mnist, run_dir, "train.epochs=3", "checkpoint.keep=3"))
    line = _one_error_line(proc)
    assert "No space left on device" in line and str(run_dir) in line
    (kept,) = checkpoint.list_checkpoints(run_dir)
    assert checkpoint.load(kept)["global_step"] == 16  # the first epoch's, whole
    assert _leftovers(run_dir) == []


def test_no_space_for_the_metrics_or_the_config(tiny_mnist, small_disk):
    run_dir = small_disk(8) / "run"  # two pages: the lock's owner file and little else
    line = _one_error_line(run_pipeline(_args(tiny_mnist, run_dir)))
    assert "No space left on device" in line and str(run_dir) in line
    assert checkpoint.list_checkpoints(run_dir) == [] and _leftovers(run_dir) == []


def test_the_run_directory_removed_during_the_run(tiny_mnist, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    with background_training(_args(tiny_mnist, run_dir, "train.epochs=100000"), log) as proc:
        wait_for_steps(run_dir, proc, log)
        shutil.rmtree(run_dir)
        proc.wait(timeout=120)
    proc.stderr = log.read_text()
    line = _one_error_line(proc)
    assert "No such file or directory" in line and str(run_dir) in line


def test_a_run_directory_the_user_cannot_write(tiny_mnist):
    as_user: list[str] = []
    if os.geteuid() == 0:  # root writes anywhere: run as the unprivileged user nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to become an unprivileged user")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    top = Path(tempfile.mkdtemp(prefix="lenet-ro-"))
    try:
        top.chmod(0o755)
        shutil.copytree(tiny_mnist, top / "data")
        home = top / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)  # the unprivileged user's cache of the decoded data
        run_dir = top / "locked"
        run_dir.mkdir(mode=0o555)
        env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": ""}
        env["WANDB_MODE"] = "disabled"
        cmd = [*as_user, sys.executable, "-m", "pipeline.train"]
        cmd += _args(top / "data", run_dir / "run", "train.fused_conv=false")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        line = _one_error_line(proc)
        assert "Permission denied" in line and str(run_dir / "run") in line
    finally:
        shutil.rmtree(top, ignore_errors=True)
