"""The launch helpers as a user types them: launch/cpu.sh and launch/single_node.sh with
overrides, `--config` anywhere among them, one and two processes, on the tiny dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, TINY_ARGS, assert_ok, child_env


def launch(script: str, args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    """Run launch/`script` ARGS from another directory, with this interpreter as $PYTHON."""
    env = child_env(
        {
            "PYTHON": sys.executable,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        }
    )
    env.pop("NPROC", None)
    if nproc is not None:
        env["NPROC"] = str(nproc)
    return subprocess.run(
        [str(REPO / "launch" / script), *args],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def epochs_run(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def test_cpu_sh_trains_one_process_with_overrides(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(
        "cpu.sh",
        ["train.epochs=1", f"data.root={tiny_mnist}", *TINY_ARGS[1:], f"train.run_dir={run_dir}"]
        + ["data.val_size=0"],
    )
    assert_ok(proc)
    assert "world 1 (single, gloo)" in proc.stdout
    assert "config: configs/cpu.yaml" in proc.stdout  # the script's default
    assert "train.epochs=1 (config: 3)" in proc.stdout and "dist.device=cpu" in proc.stdout
    assert proc.stdout.count("epoch 1: train loss") == 1 and "epoch 2" not in proc.stdout
    assert epochs_run(run_dir) == [1]


def test_cpu_sh_trains_two_ranks_with_config_among_the_overrides(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train.epochs=1",
        "--config",
        "configs/cpu.yaml",
        f"data.root={tiny_mnist}",
        *TINY_ARGS[1:],
        f"train.run_dir={run_dir}",
        "data.val_size=0",
    ]
    proc = launch("cpu.sh", args, nproc=2)
    assert_ok(proc)
    assert "world 2 (torchrun, gloo)" in proc.stdout
    assert proc.stdout.count("config: configs/cpu.yaml") == 1  # rank 0 only
    assert "train.epochs=1 (config: 3)" in proc.stdout
    assert proc.stdout.count("epoch 1: train loss") == 1
    assert epochs_run(run_dir) == [1]


def test_single_node_sh_trains_with_overrides(tiny_mnist, tmp_path):
    # Without GPUs it starts one process, on CPU; with GPUs, one process keeps the test small.
    nproc = 1 if torch.cuda.is_available() else None
    run_dir = tmp_path / "run"
    args = [f"data.root={tiny_mnist}", *TINY_ARGS, f"train.run_dir={run_dir}", "data.val_size=0"]
    proc = launch("single_node.sh", args, nproc=nproc)
    assert_ok(proc)
    assert "world 1 (single, " in proc.stdout
    assert "config: configs/mnist_lenet.yaml" in proc.stdout
    assert "train.epochs=1 (config: 8)" in proc.stdout
    assert epochs_run(run_dir) == [1]


def test_a_bad_override_stops_cpu_sh_with_one_line():
    proc = launch("cpu.sh", ["train.epochs=0"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: config key train.epochs: 0 is out of range; it must be a number > 0"
    )
