"""The operators one training step sends to kernels, counted on CPU, setting by setting.

    python bench/step_ops.py [--batch 64]

Runs the engine's step (`Engine.train_step`, LeNet on torch's ops: train.fused_conv=false) three
times, then counts, over one more step, every aten operator that reaches a kernel after autograd
and torch's decompositions (a TorchDispatchMode), leaving out views and other metadata-only
operators. On a GPU each of them is one kernel launch or a few (a convolution's backward is
two or three), each with its host cost; under train.cuda_graph=whole_step all but the batch's
copies and the learning rate's fill are one graph launch. docs/speed.md has the table; the
device call that measures the step times is `bash bench/gpu.sh`.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config.schema import load_config  # noqa: E402
from pipeline.dist.group import DistContext  # noqa: E402
from pipeline.model import LeNet  # noqa: E402
from pipeline.training.engine import Engine  # noqa: E402

# Operators that make no kernel: views, allocation, autograd's bookkeeping, the profiler's marks.
NO_KERNEL = {
    "aten::detach",
    "aten::t",
    "aten::view",
    "aten::_unsafe_view",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::expand",
    "aten::lift_fresh",
    "aten::alias",
    "profiler::_record_function_enter_new",
    "profiler::_record_function_exit",
}

SETTINGS = {
    "sgd with momentum, fp32, one micro-batch": [],
    "sgd, gradients in buffers (zero_grad keeps them)": ["buffers"],
    "adam": ["optim.name=adam"],
    "sgd, bf16 autocast": ["train.precision=bf16"],
    "sgd, optim.clip_grad_norm=1": ["optim.clip_grad_norm=1"],
    "sgd, train.grad_accum=2": ["train.grad_accum=2"],
    "sgd, train.cuda_graph=whole_step (eager on CPU)": ["train.cuda_graph=whole_step"],
}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name.removeprefix("aten::")] += 1
        return func(*args, **(kwargs or {}))


def count(overrides: list[str], batch: int) -> collections.Counter[str]:
    buffers = "buffers" in overrides
    overrides = [o for o in overrides if o != "buffers"]
    cfg = load_config(None, ["train.fused_conv=false", f"train.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    engine = Engine(LeNet(), cfg, DistContext(), steps_per_epoch=10, total_steps=10)
    if buffers:  # what a compiled CUDA-graph step with accumulation keeps
        engine.grad_buffers = True
        for p in engine.params:
            p.grad = torch.zeros_like(p)
    accum = cfg.train.grad_accum
    x, y = torch.randn(batch // accum, 1, 32, 32), torch.randint(0, 10, (batch // accum,))
    for _ in range(3):
        engine.train_step([(x, y)] * accum)
    with Count() as counted:
        engine.train_step([(x, y)] * accum)
    return counted.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, overrides in SETTINGS.items():
        ops = count(overrides, args.batch)
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
        print(f"{sum(ops.values()):4d}  {name}  ({top}, ...)")


if __name__ == "__main__":
    main()
