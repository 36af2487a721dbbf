"""TensorBoard event files: written by default where the tensorboard package is installed, and
`tensorboard --logdir` lists the run; without the package nothing is imported or said unless
tracking.tensorboard=true asks for it (one error line). The scalars, read back with
TensorBoard's own reader, equal metrics.jsonl and steps.jsonl, each step once, also after a run
killed between checkpoints and resumed (its second attempt logs those steps again)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import train
from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.errors import EXIT_CONFIG
from pipeline.tracking.tracker import Console, make_tracker, tracking_status

from helpers import TINY_ARGS, assert_ok, child_env, read_jsonl, require, run_pipeline


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files, as TensorBoard shows them."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        require("tensorboard is not installed (pip install tensorboard)")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_each_step_once_with_the_values_of_the_json_lines(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "train.log_every=2",
        "checkpoint.every_steps=4",
        "tracking.tensorboard=true",
    ]
    # Killed at step 11: steps 2-10 were logged, the newest checkpoint is of step 8.
    killed = run_pipeline(args, faults=["--fail-rank", "0", "--fail-step", "11"])
    assert killed.returncode == 17, killed.stderr
    assert read_jsonl(run_dir / "steps.jsonl")[-1]["step"] == 10
    resumed = run_pipeline(args)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "global step 8)" in resumed.stdout

    found = scalars(run_dir)
    steps, epochs = read_jsonl(run_dir / "steps.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert (
        [s for s, _ in found["train/loss"]] == [r["step"] for r in steps] == list(range(2, 33, 2))
    )
    for key in ("loss", "images_per_s", "lr"):
        got = [v for _, v in found[f"train/{key}"]]
        assert got == pytest.approx([r[key] for r in steps], rel=1e-6), key
    assert [s for s, _ in found["epoch/test_accuracy"]] == [16, 32]
    for key in ("train_loss", "test_loss", "test_accuracy", "lr"):
        got = [v for _, v in found[f"epoch/{key}"]]
        assert got == pytest.approx([r[key] for r in epochs], rel=1e-6), key


def serve(logdir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`tensorboard --logdir logdir` on a free port, as a user starts it, and the URL it prints
    (its output goes to `log`)."""
    command = Path(sys.executable).with_name("tensorboard")
    if not command.exists():
        require("the tensorboard command is not installed (pip install tensorboard)")
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(command), "--logdir", str(logdir), "--port", "0", "--host", "127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    deadline = time.monotonic() + 120  # a guard against a server that never starts
    while server.poll() is None and time.monotonic() < deadline:
        found = re.search(r"at (http://\S+/) ", log.read_text())
        if found:
            return server, found.group(1)
        time.sleep(0.2)
    server.kill()
    raise AssertionError(f"tensorboard printed no URL: {log.read_text()[-2000:]}")


def get(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_a_run_without_tracking_keys_writes_event_files_that_tensorboard_lists(
    tiny_mnist, tmp_path
):
    if importlib.util.find_spec("tensorboard") is None:
        require("tensorboard is not installed (pip install tensorboard)")
    runs = tmp_path / "runs"
    proc = run_pipeline(
        [
            *TINY_ARGS,
            f"data.root={tiny_mnist}",
            f"train.run_dir={runs / 'tiny'}",
            "train.max_steps=4",
        ]
    )
    assert_ok(proc)
    assert " | TensorBoard on | run dir " in proc.stdout
    assert list((runs / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    server, url = serve(runs, tmp_path / "tensorboard.log")
    try:
        deadline = time.monotonic() + 120  # the server reads the folder in the background
        while "tiny/tensorboard" not in get(url + "data/runs") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert get(url + "data/runs") == ["tiny/tensorboard"]
        tags = get(url + "data/plugin/scalars/tags")["tiny/tensorboard"]
        assert {"train/loss", "train/lr", "epoch/train_loss"} <= set(tags)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_without_the_package_nothing_is_imported_or_said_unless_asked(
    tmp_path, monkeypatch, capsys
):
    """auto: no event files, no import, no warning, and the header says so; true: the train
    command ends with one line and exit 2 before it loads any data."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not found, and no import can succeed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(None, ["tracking.mode=disabled", f"train.run_dir={tmp_path / 'run'}"])
    assert cfg.tracking.tensorboard == "auto"
    assert tracking_status(cfg.tracking) == "W&B off | TensorBoard off"
    assert [type(s) for s in make_tracker(DistContext(), cfg).sinks] == [Console]
    assert capsys.readouterr().err == ""
    code = train.main(["tracking.tensorboard=true", f"data.root={tmp_path / 'absent'}"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and err.count("\n") == 1, err
    assert "tracking.tensorboard=true but the tensorboard package is not installed" in err
