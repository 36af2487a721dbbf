"""The benchmark's arithmetic (pipeline/speed/benchmark/results.py): seeds averaged, time to an
accuracy read on their mean at every evaluation, the speedup as the median of per-round ratios,
the table; and the check of a case's config for its device (runner.py). (The benchmark run on
the real MNIST: tests/integration/test_bench.py.)"""

import pytest

from pipeline.errors import ConfigError
from pipeline.speed.benchmark.results import aggregate, headlines, markdown, summarize
from pipeline.speed.benchmark.runner import Case, case_config

from helpers import REPO


def _run(seed, accuracy, ends, images_per_s):
    return {
        "name": "case",
        "seed": seed,
        "accuracy": accuracy,
        "epoch_s": [ends[0], *(b - a for a, b in zip(ends[:-1], ends[1:], strict=False))],
        "epoch_end_s": ends,
        "eval_s": ends,
        "eval_accuracy": accuracy,
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


def test_time_to_accuracy_is_read_at_the_evaluations_within_epochs():
    # Evaluated at two points an epoch: the mean of both seeds reaches 99% mid-epoch 2.
    def run(seed, eval_accuracy, eval_s):
        r = _run(seed, eval_accuracy[1::2], eval_s[1::2], 100.0)
        r.update(eval_s=eval_s, eval_accuracy=eval_accuracy)
        return r

    r = aggregate(
        [
            run(0, [0.97, 0.985, 0.991, 0.992], [0.1201, 0.2402, 0.3603, 0.4804]),
            run(1, [0.95, 0.982, 0.990, 0.993], [0.1205, 0.2406, 0.3607, 0.4808]),
        ]
    )
    assert r["accuracy"] == pytest.approx([0.9835, 0.9925])  # by epoch: its last evaluation
    assert r["time_to"]["98%"] == pytest.approx(0.24040)  # at epoch 1's end
    assert r["time_to"]["99%"] == pytest.approx(0.36050)  # within epoch 2, not at its end


def test_the_table_shows_the_cold_compile_apart_and_times_to_accuracy_in_milliseconds():
    runs = [_run(s, [0.97, 0.991], [0.1234, 0.2468], 1e6) for s in range(3)]
    for r, first in zip(runs, (41.5, 3.0, 2.0), strict=True):
        r["first_step_s"] = first
    r = aggregate(runs)
    r.update(kind="pipeline", config="configs/fast_gpu.yaml", world=1, name="pipeline fast_gpu")
    r.update(threads=1, batch_size=512, precision="bf16", compile="model", overrides=[])
    result = {
        "machine": {"cpu": "cpu", "cores": 16, "torch": "2", "python": "3", "numpy": "2"},
        "command": "python -m pipeline.bench",
        "date": "today",
        "repeat": 1,
        "seeds": [0, 1, 2],
        "warmup_steps": 5,
        "evals_per_epoch": 20,
        "baseline_transform": "",
        "baseline_workers": 4,
        "records": summarize([r]),
    }
    result["machine"]["platform"] = "linux"
    (row,) = [line for line in markdown(result).splitlines() if line.startswith("| pipeline")]
    cells = [c.strip() for c in row.split("|")]
    assert cells[10] == "41.50 / 2.50"  # the first seed's cold compile, then the median warm
    assert cells[12:14] == ["0.247", "0.247"]  # 98% and 99%: reached at the same evaluation
    assert "at 20 points an epoch" in markdown(result)


def test_the_benchmark_checks_a_case_for_the_device_it_runs_on():
    """fp16 needs CUDA: a GPU case takes it, a CPU case refuses it, before any process starts."""
    config = str(REPO / "configs" / "fast_gpu.yaml")
    case = Case("pipeline fast_gpu.yaml w1", "pipeline", config, 1, ["train.precision=fp16"])
    cfg = case_config(case, "data", "cuda", seed=3)
    assert (cfg.train.precision, cfg.dist.device, cfg.train.seed) == ("fp16", "cuda", 3)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        case_config(case, "data", "cpu", seed=None)
