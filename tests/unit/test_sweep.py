"""Sweep files: a grid and/or a list of points times seeds, expanded into named points, each with
its own run directory and training command; every point checked when the file is read; a bad
file is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.sweeps import slurm, spec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_a_grid_times_seeds_gives_named_points_with_their_own_directories(tmp_path):
    sweep = spec.load(
        write(
            tmp_path,
            "base: cpu\noverrides: {train.epochs: 1}\ngrid: {optim.lr: [0.05, 0.1]}\nseeds: 2\n",
        )
    )
    assert sweep.name == "sweep" and sweep.base.name == "cpu.yaml"
    names = [p.name for p in sweep.points]
    assert names == [
        "optim.lr=0.05,train.seed=0",
        "optim.lr=0.05,train.seed=1",
        "optim.lr=0.1,train.seed=0",
        "optim.lr=0.1,train.seed=1",
    ]
    p = sweep.points[3]
    assert p.run_dir == Path("runs/sweeps/sweep/optim.lr=0.1,train.seed=1")
    assert p.args == [
        "--config",
        str(sweep.base),
        "train.epochs=1",
        "optim.lr=0.1",
        "train.seed=1",
        f"train.run_dir={p.run_dir}",
        "tracking.group=sweep",
    ]
    assert sweep.root == Path("runs/sweeps/sweep")


def test_points_are_added_to_the_grid_and_the_shipped_example_is_valid(tmp_path):
    text = (
        "base: cpu\nname: mix\ngrid: {optim.lr: [0.1]}\n"
        "points: [{optim.name: adam, optim.lr: 0.001}]\nrun_dir: out/{sweep}-{point}\n"
    )
    sweep = spec.load(write(tmp_path, text))
    assert [p.name for p in sweep.points] == ["optim.lr=0.1", "optim.lr=0.001,optim.name=adam"]
    assert sweep.points[1].run_dir == Path("out/mix-optim.lr=0.001,optim.name=adam")
    example = spec.load("sweeps/lr_seeds")
    assert len(example.points) == 6 and example.name == "lr_seeds"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("grid: {optim.lr: [0.1]}\n", "no base"),
        ("base: cpu\ngird: {optim.lr: [0.1]}\n", "unknown key 'gird'; did you mean grid?"),
        ("base: cpu\ngrid: {optim.lr: 0.1}\n", "grid optim.lr must be a non-empty list"),
        ("base: cpu\nseeds: [a]\n", "seeds must be a list of integers"),
        ("base: cpu\ngrid: {optim.lr: [0.1, -1]}\n", "point optim.lr=-1: config key optim.lr"),
        ("base: cpu\ngrid: {optim.lrate: [0.1]}\n", "unknown config key optim.lrate"),
        ("base: cpu\nseeds: 2\nrun_dir: runs/x\n", "gives two points one directory"),
        ("base: nowhere\n", "config file nowhere not found"),
        ("method: grid\nparameters: {optim.lr: {values: [1]}}\n", "this is a W&B sweep file"),
    ],
)
def test_a_bad_sweep_file_is_one_line(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        spec.load(write(tmp_path, text))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_array_covers_the_points_left_with_a_throttle():
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert slurm.array_spec([3], max_running=2) == "3%2"
