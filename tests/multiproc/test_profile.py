"""train.profile=A:B on the fused conv kernels (the training command called in this process):
the trace holds this CPU's build of the kernels, forward and backward, and the optimizer step.
(The profile on torch's conv ops, its table, a bad range and no profile:
tests/unit/test_profile.py, whose tier never builds the kernels.)"""

from __future__ import annotations

import json

from pipeline.speed import kernels_build

from helpers import TINY_ARGS, assert_ok, train_here


def test_a_profile_holds_the_fused_kernels_steps_and_optimizer(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}"]
    proc = train_here([*args, "train.fused_conv=true", "train.profile=4:8", "train.max_steps=12"])
    assert_ok(proc)
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == [f"ProfilerStep#{i}" for i in range(1, 5)], steps  # 4 steps recorded
    ns = kernels_build.namespace(kernels_build.cpu_variant())
    assert {f"{ns}::conv1_pool_relu", f"{ns}::conv2_pool_relu_backward"} <= names, names
    assert any(n.startswith("Optimizer.step#SGD.step") for n in names)
    table = (run_dir / "profile" / "rank0-top.txt").read_text()
    assert "Self CPU" in table and "Optimizer.step#SGD.step" in table
    assert "profile of steps 5-8: trace in " in proc.stdout and table.strip() in proc.stdout
