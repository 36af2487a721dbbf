"""train.profile=A:B: a Chrome/Perfetto trace of the steps A+1..B in RUN_DIR/profile that holds
the convolutions and the optimizer step, and the table of the top operators by self time,
printed and saved; a bad range is one line; off, nothing is written."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import EXIT_CONFIG
from pipeline.speed import kernels_build

from helpers import TINY_ARGS, assert_ok, run_pipeline


@pytest.mark.parametrize("fused_conv", ["false", "true"])
def test_a_profile_holds_the_steps_convolutions_and_optimizer(tiny_mnist, tmp_path, fused_conv):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}"]
    args += [f"train.fused_conv={fused_conv}"]
    proc = run_pipeline([*args, "train.profile=4:8", "train.max_steps=12"])
    assert_ok(proc)
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == [f"ProfilerStep#{i}" for i in range(1, 5)], steps  # 4 steps recorded
    if fused_conv == "true":  # this CPU's build of the kernels, forward and backward
        ns = kernels_build.namespace(kernels_build.cpu_variant())
        assert {f"{ns}::conv1_pool_relu", f"{ns}::conv2_pool_relu_backward"} <= names, names
    else:
        assert "aten::mkldnn_convolution" in names, sorted(names)[:50]
    assert any(n.startswith("Optimizer.step#SGD.step") for n in names)
    table = (run_dir / "profile" / "rank0-top.txt").read_text()
    assert "Self CPU" in table and "Optimizer.step#SGD.step" in table
    assert "profile of steps 5-8: trace in " in proc.stdout and table.strip() in proc.stdout


def test_without_a_profile_nothing_is_written_and_a_bad_range_is_one_line(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}", "train.max_steps=2"]
    assert_ok(run_pipeline(args))
    assert not (run_dir / "profile").exists()
    bad = run_pipeline([*args, "train.profile=8:4"])
    assert bad.returncode == EXIT_CONFIG
    assert bad.stderr.strip() == (
        "error: config key train.profile: '8:4': use A:B with A < B, e.g. 20:30"
    )
