"""The report follows the split: the validation metric that selected the model and the test
accuracy of the selected model, for a finished run and one still running; the plots take
validation and per-epoch test curves. Run directories written here as training writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.results.plots import plot
from pipeline.results.records import load_run, summarize, summary_text


def fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def epoch(n: int, **scores) -> dict:
    base = {"epoch": n, "step": 10 * n, "train_loss": 1.0 / n, "epoch_time_s": 1.0}
    return {**base, "images_per_s": 640.0, "lr": 0.1, **scores}


def write_run(run_dir: Path, epochs: list[dict], summary: dict | None) -> Path:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


SPLIT_EPOCHS = [
    epoch(1, val_loss=0.3, val_accuracy=0.97, test_accuracy_this_epoch=0.975, best_epoch=1),
    epoch(2, val_loss=0.2, val_accuracy=0.985, test_accuracy_this_epoch=0.99, best_epoch=2),
    epoch(3, val_loss=0.25, val_accuracy=0.98, test_accuracy_this_epoch=0.991, best_epoch=2),
]


def test_a_finished_run_shows_the_selection_and_the_test_of_the_selected_model(tmp_path):
    summary = {
        "epochs": 3,
        "global_step": 30,
        "stop_reason": "early_stop",
        "selection_metric": "val_accuracy",
        "selection_split": "val",
        "selected_epoch": 2,
        "selected_value": 0.985,
        "test_accuracy": 0.9895,
        "test_loss": 0.031,
        "test_of": "best.pt (epoch 2)",
    }
    run = load_run(write_run(tmp_path / "run", SPLIT_EPOCHS, summary))
    f = fields(summary_text(run, summarize(run)))
    assert f["status"] == "finished (stopped early after epoch 3)"
    assert f["selected"] == "epoch 2 by val_accuracy (98.50%)"
    assert f["test accuracy"] == "98.95% (test loss 0.0310, of best.pt (epoch 2))"
    # The last epoch's own test accuracy is shown as what it is, not as the model's.
    assert f["last epoch"] == (
        "val accuracy 98.00%, val loss 0.2500; test accuracy this epoch 99.10%"
    )
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    written = plot(run, tmp_path / "out")
    assert {p.name for p in written} == {"loss.png", "accuracy.png"}  # no steps.jsonl here


def test_a_running_run_shows_the_epoch_selected_so_far_and_no_test_yet(tmp_path):
    run = load_run(write_run(tmp_path / "run", SPLIT_EPOCHS[:2], None))
    f = fields(summary_text(run, summarize(run)))
    assert f["status"].startswith("not finished")
    assert f["selected"] == "epoch 2 by val_accuracy (98.50%) so far"
    assert f["test accuracy"] == "n/a (the selected model is tested when the run ends)"
