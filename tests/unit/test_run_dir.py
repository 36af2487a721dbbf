"""train.run_dir as a template: the same command gets the same directory, a command that trains
differently or is cut short (a trial) a directory of its own; settings that do not change the
result leave it alone. A finished run's line says how to train it on or start again."""

from __future__ import annotations

import pytest
from fakes import make_trainer

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
        "train.max_steps=0",  # the config's own value: the full run
    ]
    assert rendered(same) == "runs/cpu"


def test_a_trial_cut_short_gets_its_own_directory_and_the_same_one_again():
    """The config's full run, started after a trial, never resumes the trial; the trial's own
    command (a requeued job) resumes it, and naming its directory trains it on."""
    assert rendered(["train.max_steps=30"]) == "runs/cpu,train.max_steps=30"
    assert rendered(["train.max_steps=30"]) == rendered(["train.max_steps=30.0"])
    assert rendered(["train.epochs=1"]) == "runs/cpu,train.epochs=1"
    assert rendered(["train.max_steps=30", "optim.lr=0.1", "train.epochs=2"]) == (
        "runs/cpu,optim.lr=0.1,train.epochs=2,train.max_steps=30"
    )
    on = rendered(["train.run_dir=runs/cpu,train.max_steps=30", "train.max_steps=100"])
    assert on == "runs/cpu,train.max_steps=30"
    assert rendered(["train.max_steps=100", "train.run_dir=runs/mine"]) == "runs/mine"


@pytest.mark.parametrize(
    "overrides, state, said",
    [
        (
            ["train.max_steps=4"],
            {"global_step": 4},
            "(global step 4, at train.max_steps=4); train it on with "
            "`train.run_dir=runs/test train.max_steps=N` (0: to its epochs); ",
        ),
        (["train.epochs=2"], {"global_step": 32, "epoch": 2}, "(global step 32); "),
    ],
)
def test_a_finished_run_says_how_to_go_on_or_start_again(overrides, state, said, capsys):
    t = make_trainer(overrides)
    for key, value in state.items():
        setattr(t.state, key, value)
    t.run()
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        f"nothing to do: the run in runs/test already finished {said}for a new run use another "
        "train.run_dir or remove runs/test"
    )
    assert t.tracker.summary is None  # nothing was trained, tested or written


def test_the_other_fields_and_an_explicit_directory():
    env = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "WANDB_RUN_ID": "abc123"}
    template = "train.run_dir=r/{config}-{seed}-{slurm_job}-{slurm_array_task}-{wandb_run}"
    assert rendered([template, "train.seed=4"], env=env) == "r/cpu-4-77-3-abc123"
    assert rendered(["train.run_dir=runs/mine", "optim.lr=0.1"]) == "runs/mine"
    assert rendered([], config=None) == "runs/default"


def test_an_unknown_field_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown field \{lr\}; the fields are \{config\}"):
        rendered(["train.run_dir=runs/{lr}"])
