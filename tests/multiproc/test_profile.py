"""train.profile=A:B: a Chrome/Perfetto trace of the steps A+1..B in RUN_DIR/profile that holds
the convolutions and the optimizer step, and the table of the top operators by self time,
printed and saved; a bad range is one line; off, nothing is written."""

from __future__ import annotations

import json

from pipeline.errors import EXIT_CONFIG

from helpers import TINY_ARGS, assert_ok, run_pipeline


def test_a_profile_holds_the_steps_convolutions_and_optimizer(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}"]
    proc = run_pipeline([*args, "train.profile=4:8", "train.max_steps=12"])
    assert_ok(proc)
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == [f"ProfilerStep#{i}" for i in range(1, 5)], steps  # 4 steps recorded
    conv = {"lenet::conv1_pool_relu", "aten::mkldnn_convolution", "aten::convolution"}
    assert names & conv, sorted(names)[:50]  # the fused kernels, or torch's convolutions
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
