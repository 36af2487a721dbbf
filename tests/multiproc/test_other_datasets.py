"""Training, evaluation and the benchmark read the dataset the run names (data.dataset), through
one data path: a Fashion-MNIST run (tiny IDX files in FashionMNIST/raw, no MNIST beside them)
is evaluated on Fashion-MNIST's test set, with exactly the accuracy training logged."""

from __future__ import annotations

import json

from pipeline import evaluate

from helpers import TINY_ARGS, assert_ok, read_jsonl, run_bench, run_pipeline, write_tiny_mnist


def test_a_fashion_mnist_run_is_evaluated_on_fashion_mnist(tmp_path, capsys):
    root = write_tiny_mnist(tmp_path / "data", seed=3, folder="FashionMNIST")
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={root}",
        "data.dataset=fashion_mnist",
        f"train.run_dir={run_dir}",
    ]
    proc = run_pipeline(args)
    assert_ok(proc)
    assert "| data fashion_mnist |" in proc.stdout
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


def test_the_benchmark_reads_the_configured_dataset(tmp_path):
    root = write_tiny_mnist(tmp_path / "data", folder="KMNIST")
    proc = run_bench(
        [
            "--quick",
            "--only",
            "^pipeline cpu.yaml w1$",
            "--set",
            "data.dataset=kmnist",
            "--data-root",
            str(root),
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = json.loads((tmp_path / "b" / "cpu-quick-partial.json").read_text())["records"]
    assert "data.dataset=kmnist" in record["overrides"]
    assert record["images"] == record["steps"] * 64 and record["steps"] == 3 * 512 // 64
    assert not (root / "MNIST").exists()
