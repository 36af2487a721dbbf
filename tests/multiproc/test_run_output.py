"""What a user reads when a run starts, trains, resumes and has nothing left to do, on real
runs: the header with one word for W&B, the overrides instead of the whole config, img/s that
say what they measure. (W&B not imported unless asked for: tests/unit/test_tracking.py.)"""

from __future__ import annotations

import pytest

from helpers import TINY_ARGS, assert_ok, no_credentials, run_pipeline


@pytest.fixture(scope="module")
def three_runs(tiny_mnist, tmp_path_factory):
    """One run dir: 4 steps (train.max_steps; data.mirrors overridden, unused), then resumed
    to the end with --print-config, then the same command again. W&B is auto without
    credentials."""
    tmp = tmp_path_factory.mktemp("output")
    env = no_credentials(tmp)
    args = [
        "--config",
        "configs/cpu.yaml",
        *[a for a in TINY_ARGS if not a.startswith("tracking.")],
        f"data.root={tiny_mnist}",
        f"train.run_dir={tmp / 'run'}",
        "data.val_size=0",
    ]
    first = run_pipeline([*args, "train.max_steps=4", "data.mirrors=http://127.0.0.1:9/"], env=env)
    assert_ok(first)
    resumed = run_pipeline([*args, "--print-config"], env=env)
    assert_ok(resumed)
    again = run_pipeline([*args, "--print-config"], env=env)
    assert_ok(again)
    return first, resumed, again


def from_header(stdout: str) -> list[str]:
    """The lines from the header on (a first run on CPU may build its kernels before it)."""
    lines = stdout.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("lenet-ddp ")) :]


def test_start_shows_the_overrides_not_the_config(three_runs):
    first, *_ = three_runs
    lines = from_header(first.stdout)
    assert lines[0].startswith("lenet-ddp ") and " | W&B off | " in lines[0]
    assert lines[1].startswith("config: configs/cpu.yaml (every setting: ")
    assert lines[2].startswith(
        "overrides: train.epochs=1 (config: 3), train.batch_size=32 (config: 64)"
    )
    assert "train.max_steps=4 (config: 0)" in lines[2]
    assert "data.mirrors=http://127.0.0.1:9/ (config: none)" in lines[2]  # empty in the file
    assert "resolved config" not in first.stdout and "optim:" not in first.stdout


def test_img_per_s_says_what_it_measures(three_runs):
    first, resumed, *_ = three_runs
    # Log lines every 4 steps (train.log_every), the resumed epoch's first one too.
    assert "epoch 1/1 4/16 [ 25%] loss " in first.stdout
    assert "img/s (last 4 steps)" in first.stdout
    assert "epoch 1/1 8/16 [ 50%] loss " in resumed.stdout
    assert "img/s (last 4 steps)" in resumed.stdout and "(last 8 steps)" not in resumed.stdout
    (summary,) = [line for line in resumed.stdout.splitlines() if line.startswith("epoch 1:")]
    assert "epoch average " in summary and summary.endswith(" img/s")


def test_print_config_shows_every_setting(three_runs):
    _, resumed, *_ = three_runs
    assert "resumed from " in resumed.stdout
    assert "resolved config:\n  model:\n    kernel_size: 5" in resumed.stdout


def test_a_finished_run_says_nothing_to_do_and_nothing_else(three_runs):
    *_, again = three_runs
    lines = from_header(again.stdout)
    assert len(lines) == 2, again.stdout
    assert lines[1].startswith("nothing to do: the run in ")
    assert "resum" not in again.stdout + again.stderr
