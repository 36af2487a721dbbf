"""The benchmark runs in one command on the real MNIST: the pipeline and the classic baseline of
the same config, the ratio between them, the table printed and written. Numbers are checked for
sense, never for speed (speed is what the benchmark reports, not what a test asserts). (Its
arithmetic: tests/unit/test_bench.py; without data: tests/multiproc/test_bench.py.)
"""

import json

from helpers import run_bench


def test_quick_benchmark_compares_pipeline_with_baseline(mnist_root, tmp_path):
    proc = run_bench(
        [
            "--quick",
            "--only",
            "^(baseline|pipeline) cpu.yaml w1$",
            "--data-root",
            str(mnist_root),
            "--out",
            str(tmp_path),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "cpu-quick-partial.json").read_text())
    assert result["command"].startswith("python -m pipeline.bench --quick")
    records = {r["name"]: r for r in result["records"]}
    assert set(records) == {"baseline cpu.yaml w1", "pipeline cpu.yaml w1"}
    base, ours = records["baseline cpu.yaml w1"], records["pipeline cpu.yaml w1"]
    for r in (base, ours):
        assert r["steps"] == 150 and r["images"] == 150 * 64 and r["seeds"] == [0]
        # compilation and warm-up excluded: a little less than the whole train time
        assert 0 < r["epoch_end_s"][-1] <= r["train_s"]
        assert r["images_per_s"] > 0 and r["first_step_s"] > 0
        assert 0.5 < r["accuracy"][-1] <= 1.0  # 150 steps of SGD learn something
    assert ours["baseline"] == base["name"]
    assert abs(ours["speedup"] - ours["images_per_s"] / base["images_per_s"]) < 1e-9
    table = (tmp_path / "cpu-quick-partial.md").read_text()
    assert "| pipeline cpu.yaml w1 |" in table and "| baseline cpu.yaml w1 |" in table
    assert f"{ours['speedup']:.2f}x" in proc.stdout  # the table is printed too
