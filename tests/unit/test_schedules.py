"""The learning-rate schedules, step by step through the Engine: the step schedule halves the rate
every step_epochs, one-cycle rises to optim.lr and falls to torch's final rate, and `Engine.lr`
is the rate each step used. (The rates real runs log:
tests/integration/test_documented_behaviour.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.model import LeNet
from pipeline.training.engine import Engine


def _rising(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def _rates(overrides: list[str], steps_per_epoch: int, total: int) -> list[float]:
    """The learning rate each of `total` optimizer steps used, as the Engine reports it."""
    cfg = load_config(None, ["train.fused_conv=false", *overrides])
    engine = Engine(LeNet(), cfg, DistContext(), steps_per_epoch, total)
    batch = [(torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long))]
    rates = []
    for _ in range(total):
        engine.train_step(batch)
        rates.append(engine.lr)
    return rates


def test_each_step_uses_its_schedules_rate():
    # step: 3 steps per epoch, 5 epochs, lr 0.1 halved every 2 epochs
    step = _rates(
        ["optim.lr=0.1", "optim.schedule=step", "optim.step_epochs=2", "optim.gamma=0.5"], 3, 15
    )
    assert step == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 3, rel=1e-12)

    # onecycle: 10 steps per epoch, 4 epochs; up to optim.lr over the first quarter, then down
    cycle = _rates(["optim.lr=0.1", "optim.schedule=onecycle"], 10, 40)
    peak = cycle.index(max(cycle))
    assert (peak, cycle[peak]) == (9, pytest.approx(0.1, rel=1e-12))
    assert cycle[0] == pytest.approx(0.1 / 25)  # torch's OneCycleLR default div_factor
    assert _rising(cycle[: peak + 1])
    assert _rising(cycle[peak:][::-1])
    assert cycle[-1] == pytest.approx(0.1 / 25 / 1e4)  # and final_div_factor
