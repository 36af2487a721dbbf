"""train.run_dir as a template: the same command gets the same directory, a command that trains
differently or is cut short (a trial) a directory of its own; settings that do not change the
result leave it alone. A finished run's line says how to train it on or start again. A run
directory that fills up (a small tmpfs, mounted by root) ends the run in one line naming the path
and the OS error, exit 7, the checkpoints already written intact and no temporary file left.
(A directory removed during a run, or one the user cannot write, in real processes:
tests/multiproc/test_run_dir.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fakes import make_trainer

from pipeline import train
from pipeline.config import naming
from pipeline.config.schema import load_config
from pipeline.errors import EXIT_RUN_DIR, ConfigError
from pipeline.training import checkpoint

from helpers import TINY_ARGS, require, write_tiny_mnist

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


# -- as a user meets them: the training command, in this process, on the tiny dataset -----------


def test_a_trial_and_another_learning_rate_train_apart_and_a_trial_goes_on_by_name(
    tmp_path, monkeypatch, capsys
):
    """The shipped config's run directories, relative to where the command runs: a trial cut
    short with train.max_steps trains in a directory of its own, and its command again finds it
    finished; the config's full run and one with optim.lr=0.1 start afresh in theirs; naming
    the trial's directory with a later train.max_steps trains the trial on."""
    data = f"data.root={write_tiny_mnist(tmp_path / 'data')}"
    monkeypatch.chdir(tmp_path)

    def run(*overrides: str) -> str:
        # data.val_size=0: the tiny dataset has fewer images than the config holds out.
        args = ["--config", "cpu", *TINY_ARGS, "data.val_size=0", "train.fused_conv=false"]
        assert train.main([*args, data, *overrides]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    same = "cpu,data.val_size=0,train.batch_size=32,train.epochs=1"  # the tiny data's settings
    assert f"| run dir runs/{same},train.max_steps=8" in run("train.max_steps=8")
    assert (
        f"nothing to do: the run in runs/{same},train.max_steps=8 already finished (global step "
        f"8, at train.max_steps=8); train it on with `train.run_dir=runs/{same},train.max_steps=8"
        " train.max_steps=N` (0: to its epochs); for a new run use another train.run_dir or "
        f"remove runs/{same},train.max_steps=8"
    ) in run("train.max_steps=8")
    other = "cpu,data.val_size=0,optim.lr=0.1,train.batch_size=32,train.epochs=1"
    for overrides, run_dir in (([], same), (["optim.lr=0.1"], other)):
        full = run(*overrides)  # a run of its own, never the trial resumed
        assert f"| run dir runs/{run_dir}\n" in full and "resumed" not in full
    on = run(f"train.run_dir=runs/{same},train.max_steps=8", "train.max_steps=0")
    assert f"resumed from runs/{same},train.max_steps=8/ckpt-000000008.pt" in on
    summary = json.loads(
        (tmp_path / "runs" / f"{same},train.max_steps=8" / "summary.json").read_text()
    )
    assert summary["global_step"] == 16  # the trial trained on to the end of its epoch
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == [other, same, f"{same},train.max_steps=8"]


# -- a run directory that fills up, as a user runs the training command (in this process) --------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (in KiB), mounted for the test and unmounted after it."""
    mounted = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            require(f"mounting a small tmpfs was refused here ({proc.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def full_disk_line(code: int, capsys) -> str:
    """The one error line of a run that found no space, exit 7, no traceback."""
    err = capsys.readouterr().err
    assert code == EXIT_RUN_DIR and "Traceback" not in err, f"exit {code}\n{err[-3000:]}"
    (line,) = [x for x in err.splitlines() if x.startswith("error")]
    assert "No space left on device" in line
    return line


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_no_space_for_a_checkpoint(tiny_mnist, small_disk, capsys):
    # Room for the run's small files and one checkpoint (about 500 KB), not for a second (the
    # rotating checkpoints only: best.pt, a checkpoint too, is left out here).
    run_dir = small_disk(800) / "run"
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    args += [f"train.run_dir={run_dir}", "train.epochs=3", "checkpoint.keep=3"]
    assert str(run_dir) in full_disk_line(train.main([*args, "checkpoint.keep_best=false"]), capsys)
    (kept,) = checkpoint.list_checkpoints(run_dir)
    assert checkpoint.load(kept)["global_step"] == 16  # the first epoch's, whole
    assert leftovers(run_dir) == []


def test_no_space_for_the_metrics_or_the_config(tiny_mnist, small_disk, capsys):
    run_dir = small_disk(8) / "run"  # two pages: the lock's owner file and little else
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    assert str(run_dir) in full_disk_line(train.main([*args, f"train.run_dir={run_dir}"]), capsys)
    assert checkpoint.list_checkpoints(run_dir) == [] and leftovers(run_dir) == []
