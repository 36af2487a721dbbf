"""train.profile=A:B, in this process: a Chrome/Perfetto trace of the steps A+1..B in
RUN_DIR/profile that holds the convolutions and the optimizer step, and the table of the top
operators by self time, printed and saved; a bad range is one line; off, nothing is written.
(The trace of a run on the fused conv kernels, which this tier does not build:
tests/multiproc/test_profile.py.)"""

from __future__ import annotations

import json

from pipeline import train
from pipeline.errors import EXIT_CONFIG

from helpers import TINY_ARGS

# -- the profile, as a user runs it (in this process) ----------------------------------------------


def test_a_profile_holds_the_steps_convolutions_and_optimizer(tiny_mnist, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    args += [f"train.run_dir={run_dir}", "train.profile=4:8", "train.max_steps=12"]
    assert train.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    (trace,) = (run_dir / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == [f"ProfilerStep#{i}" for i in range(1, 5)], steps  # 4 steps recorded
    assert "aten::mkldnn_convolution" in names, sorted(names)[:50]
    assert any(n.startswith("Optimizer.step#SGD.step") for n in names)
    table = (run_dir / "profile" / "rank0-top.txt").read_text()
    assert "Self CPU" in table and "Optimizer.step#SGD.step" in table
    assert "profile of steps 5-8: trace in " in out and table.strip() in out


def test_without_a_profile_nothing_is_written_and_a_bad_range_is_one_line(
    tiny_mnist, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    args += [f"train.run_dir={run_dir}", "train.max_steps=2"]
    assert train.main(args) == 0, capsys.readouterr().err
    assert not (run_dir / "profile").exists()
    capsys.readouterr()
    assert train.main([*args, "train.profile=8:4"]) == EXIT_CONFIG
    assert capsys.readouterr().err.strip() == (
        "error: config key train.profile: '8:4': use A:B with A < B, e.g. 20:30"
    )
