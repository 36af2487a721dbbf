"""Ctrl-C in a real terminal (a tmux pane, keys sent with `tmux send-keys C-c`): the first saves
a checkpoint at the next stop check and exits 130 saying so, and the same command resumes to
the parameters of an uninterrupted run; a second exits at once; during start-up it is one line;
a job of 2 ranks started with --nproc-per-node prints one line, not one per rank. Never a
traceback."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import EXIT_INTERRUPTED

from helpers import (
    REPO,
    TINY_ARGS,
    assert_ok,
    child_env,
    final_model,
    require,
    train_entry,
    train_here,
)


class Terminal:
    """A command running in a detached tmux session: its output in a file, its exit code in
    another; keys go to it as typed at a terminal. Each on a tmux server of its own, its socket
    in `tmp`: the server ends with the test (conftest.py), and no other tmux is touched."""

    def __init__(self, tmp: Path, name: str, argv: list[str], env: dict | None = None):
        if shutil.which("tmux") is None:
            require("tmux is not installed (apt-get install tmux)")
        self.session = f"lenet-test-{os.getpid()}-{name}"
        self.log, self.rc = tmp / f"{name}.log", tmp / f"{name}.rc"
        script = tmp / f"{name}.sh"
        exports = "".join(
            f"export {k}={shlex.quote(v)}\n"
            for k, v in child_env(env).items()
            if k.isidentifier() and k not in ("TMUX", "TMUX_PANE")
        )
        command = shlex.join(argv)
        script.write_text(
            f"{exports}cd {shlex.quote(str(REPO))}\n{command} > {self.log} 2>&1\n"
            f"echo $? > {self.rc}\n"
        )
        self.tmux = ["tmux", "-S", str(tmp / f"{name}.sock")]
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", self.session, "-x", "200", "-y", "50"]
            + ["bash", str(script)],
            check=True,
        )

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert not self.rc.exists(), f"ended before {needle!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r}:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def ctrl_c(self) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.session, "C-c"], check=True)

    def exit_code(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while not (self.rc.exists() and self.rc.read_text().strip()):
            assert time.monotonic() < deadline, f"still running:\n{self.text()[-3000:]}"
            time.sleep(0.05)
        return int(self.rc.read_text())

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


@pytest.fixture
def terminals():
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def _args(tiny_mnist, run_dir) -> list[str]:
    return [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "train.stop_check_every=4",
    ]


SLOW = ["--step-sleep", "0.05"]  # 16 steps an epoch: time to press the keys mid-epoch


def test_ctrl_c_saves_and_the_same_command_resumes_exactly(tiny_mnist, tmp_path, terminals):
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    assert_ok(train_here(_args(tiny_mnist, straight)))
    t = Terminal(tmp_path, "once", [sys.executable, *train_entry(_args(tiny_mnist, run_dir), SLOW)])
    terminals.append(t)
    t.wait_for("epoch 1/2 4/16")
    t.ctrl_c()
    assert t.exit_code() == EXIT_INTERRUPTED, t.text()
    out = t.text()
    assert "interrupted (Ctrl-C): saved a checkpoint at step " in out, out
    assert "run the same command again to resume" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    resumed = train_here(_args(tiny_mnist, run_dir))
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    a, b = final_model(straight), final_model(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_twice_stops_at_once_without_a_traceback(tiny_mnist, tmp_path, terminals):
    run_dir = tmp_path / "run"
    t = Terminal(
        tmp_path, "twice", [sys.executable, *train_entry(_args(tiny_mnist, run_dir), SLOW)]
    )
    terminals.append(t)
    t.wait_for("epoch 1/2 4/16")
    t.ctrl_c()
    t.ctrl_c()
    assert t.exit_code() == EXIT_INTERRUPTED, t.text()
    out = t.text()
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1, out  # the first one's checkpoint, or the second's "at once"


def test_ctrl_c_while_starting_is_one_line(tiny_mnist, tmp_path, terminals):
    """A start-up that waits on a download from a server that never answers."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        mirror = f"http://127.0.0.1:{server.getsockname()[1]}/"
        args = [
            *[a for a in TINY_ARGS if a != "data.download=false"],
            f"data.root={tmp_path / 'empty'}",
            f"data.mirrors={mirror}",
            f"train.run_dir={tmp_path / 'run'}",
        ]
        t = Terminal(tmp_path, "start", [sys.executable, "-m", "pipeline.train", *args])
        terminals.append(t)
        deadline = time.monotonic() + 60
        while not server.accept():  # the download has started: the request arrived
            assert time.monotonic() < deadline
        t.ctrl_c()
        assert t.exit_code() == EXIT_INTERRUPTED, t.text()
    out = t.text().strip().splitlines()
    assert out[-1].startswith("interrupted (Ctrl-C) while starting: nothing was saved"), out
    assert "Traceback" not in t.text()
    assert not (tmp_path / "empty" / "MNIST" / "raw").exists()  # no partial download left


def test_ctrl_c_to_two_ranks_is_one_line(tiny_mnist, tmp_path, terminals):
    run_dir = tmp_path / "run"
    # Each rank runs the fault script too, for its sleep.
    argv = [sys.executable, *train_entry(["--nproc-per-node=2", *_args(tiny_mnist, run_dir)], SLOW)]
    t = Terminal(tmp_path, "two", argv)
    terminals.append(t)
    t.wait_for("epoch 1/2 4/16")
    t.ctrl_c()
    assert t.exit_code() == EXIT_INTERRUPTED, t.text()
    out = t.text()
    lines = [line for line in out.splitlines() if "interrupted" in line or "error" in line]
    assert len(lines) == 1 and "saved a checkpoint at step" in lines[0], out
    assert "Traceback" not in out and "SignalException" not in out, out
