"""The benchmark's arithmetic (pipeline/speed/benchmark/results.py): seeds averaged, time to an
accuracy read on their mean, the speedup as the median of per-round ratios. (The benchmark run
on the real MNIST: tests/integration/test_bench.py.)"""

import pytest

from pipeline.speed.benchmark.results import aggregate, headlines, summarize


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


def test_the_default_conv_path_is_compared_with_torchs_ops_round_by_round():
    def case(name, overrides, conv, values):
        r = aggregate([_run(0, [0.9], [1.0], v) for v in values])
        kind = "baseline" if name.startswith("baseline") else "pipeline"
        r.update(kind=kind, config="configs/cpu.yaml", world=1, name=name, overrides=overrides)
        r.update(conv=conv, batch_size=64, conv_path=f"{conv} (why)")
        return r

    base = case("baseline", [], "torch ops", (100.0, 100.0, 100.0))
    default = case("pipeline", [], "fused kernels", (300.0, 150.0, 240.0))
    ops = case("torch-ops", ["train.fused_conv=false"], "torch ops", (100.0, 100.0, 80.0))
    forced = case("fused", ["train.fused_conv=true"], "fused kernels", (310.0, 160.0, 250.0))
    summarize([base, default, ops, forced])
    assert default["vs_torch_ops_runs"] == [3.0, 1.5, 3.0]
    assert default["vs_torch_ops"] == 3.0
    assert ops["vs_torch_ops"] is None and forced["vs_torch_ops"] is None  # overridden cases
    line = [h for h in headlines([base, default, ops, forced]) if "torch's ops" in h]
    assert line == [
        "- configs/cpu.yaml, 1 process(es), as configured (fused kernels (why)): 3.00x "
        "(1.50-3.00) the img/s of the same config on torch's ops (train.fused_conv=false), "
        "median of the per-round ratios."
    ]
