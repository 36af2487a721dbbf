"""The training command's arguments as a user types them: `--config` may stand anywhere among the
overrides. (The launch scripts themselves: tests/multiproc/test_launch.py.)"""

from __future__ import annotations

from pipeline.train import parse_args


def test_config_may_stand_anywhere_among_the_overrides():
    args = parse_args(["dist.device=cpu", "--config", "configs/cpu.yaml", "train.epochs=1"])
    assert args.config == "configs/cpu.yaml"
    assert args.overrides == ["dist.device=cpu", "train.epochs=1"]
    args = parse_args(["train.epochs=1", "--config=configs/cpu.yaml", "optim.lr=0.1"])
    assert args.config == "configs/cpu.yaml" and args.overrides == [
        "train.epochs=1",
        "optim.lr=0.1",
    ]
