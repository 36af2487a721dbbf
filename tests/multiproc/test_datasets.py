"""The dataset a run names (data.dataset), read by the benchmark: its cases, each in fresh
processes with the fused conv kernels built, train on the configured dataset (tiny IDX files in
KMNIST/raw, no MNIST beside them). (Training and evaluation reading it:
tests/unit/test_datasets.py.)"""

from __future__ import annotations

import json

from helpers import run_bench, write_tiny_mnist


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
