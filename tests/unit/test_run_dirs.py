"""train.run_dir as a template: the same command gets the same directory, a command that trains
differently a directory of its own; settings that do not change the result leave it alone."""

from __future__ import annotations

import pytest

from pipeline.config import naming
from pipeline.config.schema import load_config
from pipeline.errors import ConfigError

TEMPLATE = "runs/{config}{changes}"


def rendered(overrides: list[str], config: str | None = "cpu", env: dict | None = None) -> str:
    cfg = load_config(config, overrides)
    return naming.render(cfg.train.run_dir, cfg, load_config(config), config, overrides, env or {})


def test_the_same_command_gets_the_same_directory():
    assert rendered([]) == "runs/cpu"
    assert rendered([], "configs/cpu.yaml") == "runs/cpu"
    assert rendered(["optim.lr=0.05"]) == "runs/cpu"  # the file's own value: no change


def test_a_change_of_training_gets_its_own_directory_in_key_order():
    assert rendered(["optim.lr=0.1"]) == "runs/cpu,optim.lr=0.1"
    a = rendered(["train.seed=1", "optim.lr=0.1"])
    b = rendered(["optim.lr=0.10", "train.seed=1"])
    assert a == b == "runs/cpu,optim.lr=0.1,train.seed=1"
    assert rendered(["train.epochs=1"]) == "runs/cpu,train.epochs=1"
    assert rendered(["model.kernel_size=3", "data.dataset=kmnist"]) == (
        "runs/cpu,data.dataset=kmnist,model.kernel_size=3"
    )


def test_settings_that_do_not_change_the_result_leave_the_directory():
    same = [
        "data.root=/elsewhere",
        "data.download=false",
        "tracking.mode=offline",
        "train.log_every=7",
        "checkpoint.every_steps=10",
        "dist.device=cpu",
        "train.grad_accum=2",  # the same global batch: a resume accepts it
        "train.max_steps=5",  # a run stopped early and continued later
    ]
    assert rendered(same) == "runs/cpu"


def test_the_other_fields_and_an_explicit_directory():
    env = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "WANDB_RUN_ID": "abc123"}
    template = "train.run_dir=r/{config}-{seed}-{slurm_job}-{slurm_array_task}-{wandb_run}"
    assert rendered([template, "train.seed=4"], env=env) == "r/cpu-4-77-3-abc123"
    assert rendered(["train.run_dir=runs/mine", "optim.lr=0.1"]) == "runs/mine"
    assert rendered([], config=None) == "runs/default"


def test_an_unknown_field_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown field \{lr\}; the fields are \{config\}"):
        rendered(["train.run_dir=runs/{lr}"])
