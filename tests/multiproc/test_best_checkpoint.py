"""best.pt, the checkpoint of the selected epoch: never rotated away (checkpoint.keep=1), recorded
in summary.json, and what evaluate, export and predict use for a run directory (--last: the
newest checkpoint), with the test accuracy training logged for it. A real run on
`split_data.write_misleading_mnist`, whose validation loss is best after the first epoch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from split_data import write_misleading_mnist

from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, require, run_pipeline

VAL = 96
REAL_DIGIT = REPO / "docs" / "images" / "digit.png"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Four epochs, checkpoint.keep=1, selected by the validation loss (best at epoch 1)."""
    tmp = tmp_path_factory.mktemp("best")
    data = write_misleading_mnist(tmp / "data", VAL)
    run_dir = tmp / "run"
    args = [*TINY_ARGS, f"data.root={data}", f"train.run_dir={run_dir}", "train.epochs=4"]
    args += [f"data.val_size={VAL}", "checkpoint.select=val_loss", "checkpoint.keep=1"]
    proc = run_pipeline(args)
    assert_ok(proc)
    (run_dir / "stdout").write_text(proc.stdout)
    return run_dir


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_selected_epoch_is_kept_beside_the_newest_checkpoint(run_dir):
    s = summary(run_dir)
    assert s["selection_metric"] == "val_loss" and s["selection_split"] == "val"
    assert s["selected_epoch"] == 1 and s["test_of"] == "best.pt (epoch 1)"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["best_epoch"] for r in records] == [1, 1, 1, 1]
    assert s["selected_value"] == records[0]["val_loss"] == min(r["val_loss"] for r in records)
    steps_per_epoch = records[0]["step"]
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == [
        checkpoint.checkpoint_name(4 * steps_per_epoch)
    ]
    best = checkpoint.load(run_dir / checkpoint.BEST)
    assert best["best"] == {
        "epoch": 1,
        "step": steps_per_epoch,
        "metric": "val_loss",
        "value": s["selected_value"],
    }
    assert best["global_step"] == s["test_step"] == steps_per_epoch and best["epoch"] == 1
    last_line = (run_dir / "stdout").read_text().splitlines()[-1]
    assert last_line.startswith("finished 4 epoch(s); selected epoch 1 (val_loss ")
    assert last_line.endswith(
        f"test accuracy of best.pt (epoch 1): {s['test_accuracy'] * 100:.2f}% "
        f"(test loss {s['test_loss']:.4f})"
    )


def test_evaluate_uses_best_pt_and_reports_what_training_logged_for_it(run_dir, tmp_path):
    proc = run_module("pipeline.evaluate", run_dir, "--out", tmp_path / "eval")
    assert_ok(proc)
    s, results = summary(run_dir), json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert proc.stdout.startswith(f"using {run_dir / 'best.pt'} (epoch 1, global step ")
    assert "the epoch selected by val_loss " in proc.stdout.splitlines()[0]
    assert results["checkpoint"] == str(run_dir / "best.pt")
    assert results["global_step"] == s["test_step"]
    assert results["test_accuracy"] == s["test_accuracy"] and results["test_loss"] == s["test_loss"]
    assert f"training logged: {s['test_accuracy'] * 100:.2f}% at this step (the same)" in (
        proc.stdout
    )
    newest = checkpoint.list_checkpoints(run_dir)[0]
    last = run_module("pipeline.evaluate", run_dir, "--last", "--out", tmp_path / "last")
    assert_ok(last)
    assert last.stdout.startswith(f"using {newest} (epoch 4, ")
    assert "the newest checkpoint (--last)" in last.stdout.splitlines()[0]


def test_export_and_predict_say_they_use_best_pt(run_dir, tmp_path):
    out = tmp_path / "lenet.pt"
    exported = run_module("pipeline.export", run_dir, "--format", "state_dict", "--out", out)
    assert_ok(exported)
    assert exported.stdout.startswith(f"using {run_dir / 'best.pt'} ")
    best = checkpoint.load(run_dir / checkpoint.BEST)["model"]
    assert all(torch.equal(v, best[k]) for k, v in torch.load(out, weights_only=True).items())
    if importlib.util.find_spec("PIL") is None:
        require("predict needs Pillow: pip install -e .[predict]")
    predicted = run_module("pipeline.predict", run_dir, "--last", REAL_DIGIT)
    assert_ok(predicted)
    using, result = predicted.stdout.splitlines()
    newest = checkpoint.list_checkpoints(run_dir)[0]
    assert using.startswith(f"using {newest} ") and result.startswith(f"{REAL_DIGIT}: ")
