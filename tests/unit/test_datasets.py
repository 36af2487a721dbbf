"""The dataset a run names (data.dataset), in this process: training and evaluation read it
through one data path. A Fashion-MNIST run (tiny IDX files in FashionMNIST/raw, no MNIST beside
them) is evaluated on Fashion-MNIST's test set, with exactly the accuracy training logged. (The
benchmark reading it, in its own processes: tests/multiproc/test_datasets.py.)"""

from __future__ import annotations

import json

from pipeline import evaluate, train

from helpers import TINY_ARGS, read_jsonl, write_tiny_mnist

# -- the dataset a run names, as a user runs it (in this process) ----------------------------------


def test_a_fashion_mnist_run_is_evaluated_on_fashion_mnist(tmp_path, capsys):
    root = write_tiny_mnist(tmp_path / "data", seed=3, folder="FashionMNIST")
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        "train.fused_conv=false",
        f"data.root={root}",
        "data.dataset=fashion_mnist",
        f"train.run_dir={run_dir}",
    ]
    assert train.main(args) == 0, capsys.readouterr().err
    assert "| data fashion_mnist |" in capsys.readouterr().out
    (logged,) = read_jsonl(run_dir / "metrics.jsonl")
    assert not (root / "MNIST").exists()  # nothing of MNIST was needed or fetched
    assert (
        evaluate.main([str(run_dir), "--tracking", "disabled", "--out", str(tmp_path / "e")]) == 0
    )
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["dataset"] == "fashion_mnist" and result["test_count"] == 128
    assert result["test_accuracy"] == logged["test_accuracy"]
    assert result["test_loss"] == logged["test_loss"]
    assert "training logged: " in out and "(the same)" in out
    assert not (root / "MNIST").exists()
