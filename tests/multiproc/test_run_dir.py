"""A run directory that disappears during the run (removed while a background process trains)
or that the user cannot write (root without its permission override, through setpriv): one line
naming the path and the OS error, exit 7. (The run directory's name, and one that fills up, in
the test's own process: tests/unit/test_run_dir.py; one job per run directory:
tests/multiproc/test_run_lock.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import EXIT_RUN_DIR

from helpers import (
    REPO,
    TINY_ARGS,
    background_training,
    child_env,
    require,
    wait_for_steps,
)


def _args(root, run_dir, *extra):
    return [*TINY_ARGS, f"data.root={root}", f"train.run_dir={run_dir}", *extra]


def _one_error_line(proc) -> str:
    assert proc.returncode == EXIT_RUN_DIR, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    return line


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
