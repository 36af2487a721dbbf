"""`python -m pipeline.sweep FILE` on this machine, as a user runs it: a 2-point sweep on tiny
data trains each point in its own directory and ends with the comparison and the setting
chosen; a point that was interrupted resumes and ends where an uninterrupted run of it does; a
rerun skips every point and prints the table; a point that fails is reported while the others
run, and the exit code says so. Each running point says its epochs as they end."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from helpers import REPO, assert_ok, child_env, final_model, train_entry


def sweep_file(tmp_path, tiny_mnist, lrs=(0.05, 0.1)) -> str:
    path = tmp_path / "two.yaml"
    path.write_text(
        "base: cpu\n"
        "overrides: {train.epochs: 1, train.batch_size: 32, train.log_every: 4, "
        f"checkpoint.every_steps: 4, data.root: {tiny_mnist}, data.download: false, "
        "data.val_size: 64, "
        "tracking.mode: disabled}\n"
        f"grid: {{optim.lr: [{', '.join(map(str, lrs))}]}}\n"
    )
    return str(path)


def sweep(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_sweep_runs_its_points_resumes_one_and_skips_them_on_a_rerun(tiny_mnist, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = sweep_file(tmp_path, tiny_mnist)
    listed = sweep(work, path, "--list")
    assert_ok(listed)
    assert listed.stdout.splitlines() == [
        "  0  optim.lr=0.05  runs/sweeps/two/optim.lr=0.05  (not started)",
        "  1  optim.lr=0.1  runs/sweeps/two/optim.lr=0.1  (not started)",
    ]
    # Point 1 killed at step 6, after the checkpoint of step 4; and its uninterrupted twin.
    point = (
        subprocess.run(
            [sys.executable, "-m", "pipeline.sweep", path, "--point", "1", "--print-run-dir"],
            cwd=work, env=child_env(), capture_output=True, text=True, timeout=120,
        ).stdout.strip()
    )  # fmt: skip
    assert point == "runs/sweeps/two/optim.lr=0.1"
    args = [
        "--config", "cpu", "train.epochs=1", "train.batch_size=32", "train.log_every=4",
        "checkpoint.every_steps=4", f"data.root={tiny_mnist}", "data.download=false",
        "data.val_size=64",
        "tracking.mode=disabled", "optim.lr=0.1",
    ]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, *train_entry([*args, f"train.run_dir={point}"], ["--fail-rank", "0",
         "--fail-step", "6"])], cwd=work, env=child_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == 17, killed.stderr
    twin = tmp_path / "twin"
    assert_ok(
        subprocess.run(
            [sys.executable, "-m", "pipeline.train", *args, f"train.run_dir={twin}"],
            cwd=work, env=child_env(), capture_output=True, text=True,
        )
    )  # fmt: skip

    first = sweep(work, path)
    assert_ok(first)
    out = first.stdout
    assert "[1/2] optim.lr=0.05 starts" in out and "[2/2] optim.lr=0.1 resumes" in out
    assert "[1/2] optim.lr=0.05 finished in" in out and "[2/2] optim.lr=0.1 finished in" in out
    # A line after each epoch of a running point, between its start and its end.
    lines = out.splitlines()
    for point in ("[1/2] optim.lr=0.05", "[2/2] optim.lr=0.1"):
        said = [i for i, line in enumerate(lines) if line.startswith(point)]
        epochs = [i for i in said if re.fullmatch(r".* epoch 1: val accuracy \d+\.\d\d%", lines[i])]
        assert len(epochs) == 1 and said[0] < epochs[0] < said[-1], lines
    root = work / "runs" / "sweeps" / "two"
    assert sorted(p.name for p in root.iterdir()) == [
        "comparison", "logs", "optim.lr=0.05", "optim.lr=0.1"
    ]  # fmt: skip
    a, b = final_model(root / "optim.lr=0.1"), final_model(twin)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [line for line in out.splitlines() if line.startswith("| optim.lr=")]
    assert [r.split(" | ")[1:3] for r in rows] == [["0.05", "finished"], ["0.1", "finished"]]
    assert (root / "comparison" / "comparison.png").exists()
    assert out.splitlines()[-1].startswith("chosen on the validation split: optim.lr=")

    again = sweep(work, path)
    assert_ok(again)
    assert again.stdout.startswith("2 of 2 point(s) finished earlier: skipped\n| run |")
    assert "starts" not in again.stdout and "resumes" not in again.stdout
    assert again.stdout.splitlines()[-1] == out.splitlines()[-1]


def test_a_failed_point_is_reported_and_the_others_run(tiny_mnist, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # lr 1e6 makes the loss non-finite at once: exit 5 for that point only.
    result = sweep(work, sweep_file(tmp_path, tiny_mnist, lrs=(1e6, 0.1)), "--parallel", "2")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "optim.lr=1000000.0 failed (exit 5): error: the training loss became non-finite" in (
        result.stdout
    )
    assert "[2/2] optim.lr=0.1 finished in" in result.stdout
    assert "failed: optim.lr=1000000.0 (exit 5)" in result.stdout
    assert "| optim.lr=0.1 | 0.1 | finished |" in result.stdout
    assert (REPO / "pipeline").is_dir()  # the sweep ran from another directory
