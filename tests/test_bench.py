"""The benchmark runs in one command: the pipeline and the classic baseline of the same config,
the ratio between them, the table printed and written. Numbers are checked for sense, never
for speed (speed is what the benchmark reports, not what a test asserts)."""

import json

import pytest

from pipeline.benchmark.results import aggregate, summarize

from conftest import run_bench


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


def test_missing_data_is_one_line_and_exit_3(tmp_path):
    proc = run_bench(["--data-root", str(tmp_path), "--quick"], timeout=120)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "--data-root" in lines[0], lines


def _run(seed, accuracy, ends, images_per_s):
    return {
        "name": "case",
        "seed": seed,
        "accuracy": accuracy,
        "epoch_s": [ends[0], *(b - a for a, b in zip(ends[:-1], ends[1:], strict=False))],
        "epoch_end_s": ends,
        "images_per_s": images_per_s,
        **dict.fromkeys(("train_s", "first_step_s", "warmup_s", "wall_s", "other_load"), 1.0),
    }


def test_seeds_average_accuracy_and_time_to_accuracy_is_read_on_the_mean():
    # Seed 0 reaches 99% after epoch 2, seed 1 only after epoch 3: their mean after epoch 3.
    r = aggregate(
        [
            _run(0, [0.980, 0.991, 0.992], [1.0, 2.0, 3.0], 100.0),
            _run(1, [0.970, 0.985, 0.990], [1.2, 2.4, 3.6], 300.0),
        ]
    )
    assert r["seeds"] == [0, 1]
    assert r["accuracy"] == pytest.approx([0.975, 0.988, 0.991])
    assert r["time_to"]["99%"] == pytest.approx((3.0 + 3.6) / 2)  # median of two
    assert r["time_to"]["98%"] == pytest.approx((2.0 + 2.4) / 2)
    assert r["images_per_s"] == 200.0


def test_speedup_is_the_median_of_the_per_round_ratios():
    base = aggregate([_run(0, [0.9], [1.0], v) for v in (100.0, 50.0, 100.0)])
    ours = aggregate([_run(0, [0.9], [1.0], v) for v in (300.0, 200.0, 250.0)])
    base.update(kind="baseline", config="c", world=1, name="b")
    ours.update(kind="pipeline", config="c", world=1, name="p")
    summarize([base, ours])
    assert ours["speedup_runs"] == [3.0, 4.0, 2.5]
    assert ours["speedup"] == 3.0  # not 250 / 100: the slow second round cancels out
