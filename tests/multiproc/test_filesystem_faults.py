"""A run directory that cannot be written, fills up, or disappears: one line naming the path and
the OS error, exit 7, the checkpoints already written intact and no temporary file left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import EXIT_RUN_DIR
from pipeline.training import checkpoint

from helpers import (
    REPO,
    TINY_ARGS,
    background_training,
    child_env,
    require,
    run_pipeline,
    wait_for_steps,
)


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
            require(f"mounting a small tmpfs was refused here ({proc.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_no_space_for_a_checkpoint(tiny_mnist, small_disk):
    # Room for the run's small files and one checkpoint (about 500 KB), not for a second (the
    # rotating checkpoints only: best.pt, a checkpoint too, is left out here).
    run_dir = small_disk(800) / "run"
    args = _args(tiny_mnist, run_dir, "train.epochs=3", "checkpoint.keep=3")
    proc = run_pipeline([*args, "checkpoint.keep_best=false"])
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


def _remove_while_written(path: Path) -> None:
    """`rm -r path` while a run writes into it: again where the run created a file after rmtree
    had listed the directory (rmdir then fails with "Directory not empty")."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
    raise AssertionError(f"{path} is still there after 20 tries to remove it")


def test_the_run_directory_removed_during_the_run(tiny_mnist, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    with background_training(_args(tiny_mnist, run_dir, "train.epochs=100000"), log) as proc:
        wait_for_steps(run_dir, proc, log)
        _remove_while_written(run_dir)
        proc.wait(timeout=120)
    proc.stderr = log.read_text()
    line = _one_error_line(proc)
    assert "No such file or directory" in line and str(run_dir) in line


# Root writes anywhere through two capabilities: CAP_DAC_OVERRIDE (past write permission) and
# CAP_DAC_READ_SEARCH (past read and search permission). A process of root's without them meets
# permission bits as any user does, and still reads the checkout, the interpreter and its
# packages, all of which root owns, wherever they live (an unprivileged user such as nobody
# cannot read a checkout inside a directory only its owner may enter).
WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def as_a_user_who_cannot_write() -> list[str]:
    """The command prefix that runs a process as a user held to permission bits: none for a
    user, WITHOUT_OVERRIDE for root; `require`s what that needs."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        require(
            "running as root: setpriv (util-linux) is needed to drop root's permission override"
        )
    probe = subprocess.run([*WITHOUT_OVERRIDE, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        require(f"dropping root's permission override was refused here: {probe.stderr.strip()}")
    return WITHOUT_OVERRIDE


def test_a_run_directory_the_user_cannot_write(tiny_mnist, tmp_path):
    as_user = as_a_user_who_cannot_write()
    run_dir = tmp_path / "locked"
    run_dir.mkdir(mode=0o555)
    run_dir.chmod(0o555)  # whatever the umask
    cmd = [*as_user, sys.executable, "-m", "pipeline.train"]
    cmd += _args(tiny_mnist, run_dir / "run", "train.fused_conv=false")
    proc = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    line = _one_error_line(proc)
    assert "Permission denied" in line and str(run_dir / "run") in line
