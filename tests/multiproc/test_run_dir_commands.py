"""The shipped configs' run directories, as a user meets them: after a default run, the same
command with optim.lr=0.1 trains in a directory of its own, and the default command again
resumes the first run (here: finds it finished)."""

from __future__ import annotations

import subprocess
import sys

from helpers import TINY_ARGS, child_env

SMALL = ["data.val_size=0"]  # the tiny dataset has fewer images than the config holds out


def train(cwd, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", "cpu", *TINY_ARGS, *SMALL, *overrides],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_another_learning_rate_trains_apart_and_the_default_resumes(tiny_mnist, tmp_path):
    data = f"data.root={tiny_mnist}"
    first = train(tmp_path, data, "train.max_steps=8")
    assert first.returncode == 0, first.stderr
    assert "| run dir runs/cpu,data.val_size=0,train.batch_size=32,train.epochs=1" in first.stdout
    other = train(tmp_path, data, "optim.lr=0.1")
    assert other.returncode == 0, other.stderr
    assert "run dir runs/cpu,data.val_size=0,optim.lr=0.1,train.batch_size=32,train.epochs=1" in (
        other.stdout
    )
    assert "resumed" not in other.stdout
    again = train(tmp_path, data)
    assert again.returncode == 0, again.stderr
    assert (
        "resumed from runs/cpu,data.val_size=0,train.batch_size=32,train.epochs=1/ckpt-000000008.pt"
        in again.stdout
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "cpu,data.val_size=0,optim.lr=0.1,train.batch_size=32,train.epochs=1",
        "cpu,data.val_size=0,train.batch_size=32,train.epochs=1",
    ]
