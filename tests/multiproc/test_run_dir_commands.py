"""The shipped configs' run directories, as a user meets them: a trial cut short with
train.max_steps trains in a directory of its own, and its command again finds it finished; the
config's full run and one with optim.lr=0.1 start afresh in theirs; naming the trial's directory
with a later train.max_steps trains the trial on."""

from __future__ import annotations

import json
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


def test_a_trial_and_another_learning_rate_train_apart_and_a_trial_goes_on_by_name(
    tiny_mnist, tmp_path
):
    data = f"data.root={tiny_mnist}"
    same = "cpu,data.val_size=0,train.batch_size=32,train.epochs=1"  # the tiny data's settings
    trial = train(tmp_path, data, "train.max_steps=8")
    assert trial.returncode == 0, trial.stderr
    assert f"| run dir runs/{same},train.max_steps=8" in trial.stdout
    again = train(tmp_path, data, "train.max_steps=8")
    assert again.returncode == 0, again.stderr
    assert (
        f"nothing to do: the run in runs/{same},train.max_steps=8 already finished (global step "
        f"8, at train.max_steps=8); train it on with `train.run_dir=runs/{same},train.max_steps=8"
        " train.max_steps=N` (0: to its epochs); for a new run use another train.run_dir or "
        f"remove runs/{same},train.max_steps=8"
    ) in again.stdout
    other = "cpu,data.val_size=0,optim.lr=0.1,train.batch_size=32,train.epochs=1"
    for overrides, run_dir in (([], same), (["optim.lr=0.1"], other)):
        full = train(tmp_path, data, *overrides)  # a run of its own, never the trial resumed
        assert full.returncode == 0, full.stderr
        assert f"| run dir runs/{run_dir}\n" in full.stdout and "resumed" not in full.stdout
    on = train(tmp_path, data, f"train.run_dir=runs/{same},train.max_steps=8", "train.max_steps=0")
    assert on.returncode == 0, on.stderr
    assert f"resumed from runs/{same},train.max_steps=8/ckpt-000000008.pt" in on.stdout
    summary = json.loads(
        (tmp_path / "runs" / f"{same},train.max_steps=8" / "summary.json").read_text()
    )
    assert summary["global_step"] == 16  # the trial trained on to the end of its epoch
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == [other, same, f"{same},train.max_steps=8"]
