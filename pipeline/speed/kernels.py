"""Fused CPU kernels for LeNet's two stages: relu(max_pool2d(conv(x), 2)), each in one pass.

The kernels (`pipeline/speed/csrc/`) come in one build per instruction set, each with the vector
width and register blocking of its CPUs: AVX-512 (16 lanes, 32 registers), AVX2 (8 lanes, 16
registers) and a portable one for the others; `pipeline.speed.kernels_build` builds and caches them.
`load()` builds (once) and loads the variant for this CPU (the widest torch runs here).

`choose(setting, batch)` is how a run picks its conv path from `train.fused_conv`: `false`,
torch's ops; `true`, the kernels; `auto`, whichever is faster here, timed the first time (a
few forward and backward passes of LeNet at the run's batch shape, thread count and precision,
each path in turn) and remembered beside the kernels' build, per CPU model, for as long as
that build stands. Each choice comes with a one-line reason for the run's header.

`conv_pool_relu` is what `LeNet` calls for each stage when the kernels are attached: it gives
the values and gradients of torch's three ops (up to float rounding) and falls back to those
ops wherever a kernel does not apply: another device, dtype or shape, torch.compile tracing,
conv1's input needing its own gradient. Under bf16 autocast the kernels still run, in fp32 (the
next layer casts their output): on LeNet that is faster than torch's bf16 ops, and no less
precise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.atomic import write_atomic
from pipeline.model import LeNet
from pipeline.model import conv_pool_relu as torch_conv_pool_relu
from pipeline.speed import kernels_build
from pipeline.speed.kernels_build import (  # noqa: F401 - re-exported: the kernels' build, in one place
    FAILED,
    VARIANTS,
    build_dir,
    compiler,
    cpu_variant,
    openmp,
    runs_here,
    toolchain_problem,
)

log = logging.getLogger(__name__)

UNAVAILABLE = "the fused conv kernels are not available"
_SPEED = "speed.json"  # in a build directory: the timings `auto` decided on
_ROUNDS, _PASSES = 5, 2  # the timing: rounds of each path in turn, passes a round


def load(variant: str | None = None) -> str | None:
    """Build (once) and load the kernels of `variant` (default: this CPU's); None when they
    are ready, else why they are not."""
    return kernels_build.load(variant or cpu_variant())


def choose(
    setting: str,
    batch: int,
    kernel_size: int = 5,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> tuple[bool, str]:
    """Whether a run with `train.fused_conv=setting` trains on the kernels, and why, in a few
    words for the run's header. `batch`: the images of one forward pass on this rank."""
    if torch.device(device).type != "cpu":
        return False, "torch's ops (the fused conv kernels are CPU kernels)"
    if setting == "false":
        return False, "torch's ops (train.fused_conv=false)"
    variant = cpu_variant()
    problem = load(variant)
    if problem:
        return False, f"torch's ops: {UNAVAILABLE}: {problem}"
    build = f"{VARIANTS[variant].label} build"
    if setting == "true":
        return True, f"fused conv kernels ({build}, train.fused_conv=true)"
    ratio = speedup(variant, batch, kernel_size, precision)
    once = "measured once on this machine"
    if ratio >= 1:
        return True, f"fused conv kernels ({build}: {ratio:.1f}x torch's ops, {once})"
    return False, f"torch's ops ({1 / ratio:.1f}x the fused conv kernels' {build}, {once})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speedup(variant: str, batch: int, kernel_size: int = 5, precision: str = "fp32") -> float:
    """How many times faster a LeNet forward and backward at `batch` runs on the kernels of
    `variant` (loaded) than on torch's ops, on this CPU at this thread count: measured once,
    then read from the build directory (for as long as that build of the kernels stands)."""
    cpu = [_cpu_name(), os.cpu_count(), torch.get_num_threads()]
    key = json.dumps([*cpu, batch, kernel_size, precision])
    build = kernels_build.library_key(variant)
    directory = build_dir(variant)
    directory.mkdir(parents=True, exist_ok=True)
    with kernels_build.exclusive(directory):  # ranks starting together: one measures, alone
        known = kernels_build.read_json(directory / _SPEED)
        timings = known.get("timings", {}) if known.get("build") == build else {}
        if key in timings:
            return timings[key]["speedup"]
        seconds = _time_paths(variant, batch, kernel_size, precision)
        ratio = seconds["torch"] / seconds["fused"]
        timings[key] = {"speedup": ratio, "seconds": seconds, "date": time.strftime("%F %T")}
        write_atomic(directory / _SPEED, json.dumps({"build": build, "timings": timings}, indent=1))
    log.info(
        "timed LeNet's conv paths at batch %d: the fused conv kernels (%s) run at %.2fx "
        "torch's ops' speed (remembered in %s)",
        batch,
        VARIANTS[variant].label,
        ratio,
        directory / _SPEED,
    )
    return ratio


def _time_paths(variant: str, batch: int, kernel_size: int, precision: str) -> dict[str, float]:
    """Seconds a forward and backward pass of LeNet takes on each conv path: the median over
    rounds that run each path in turn (a busy spell of the machine hits both alike)."""
    with torch.random.fork_rng(devices=[]):  # the run's random stream stays untouched
        torch.manual_seed(0)
        net = LeNet(kernel_size).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 1, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
    bf16 = precision == "bf16"
    paths = {
        "fused": functools.partial(conv_pool_relu, variant=variant),
        "torch": torch_conv_pool_relu,
    }

    def passes(path: Callable, n: int) -> float:
        net.conv_pool_relu = path
        started = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
        return (time.perf_counter() - started) / n

    for path in paths.values():
        passes(path, _PASSES)  # warm-up: first calls, allocations
    times = {name: [] for name in paths}
    for _ in range(_ROUNDS):
        for name, path in paths.items():
            times[name].append(passes(path, _PASSES))
    return {name: statistics.median(t) for name, t in times.items()}


class _Conv1PoolReLU(torch.autograd.Function):
    """conv1 (1 -> 6): the input's gradient is never needed, only the weight's and bias's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ops):
        y, code = ops.conv1_pool_relu(x, weight, bias)
        ctx.save_for_backward(code, x)
        ctx.kernel_size, ctx.ops = weight.shape[-1], ops
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        code, x = ctx.saved_tensors
        grad_w, grad_b = ctx.ops.conv1_pool_relu_backward(grad_y, code, x, ctx.kernel_size)
        return None, grad_w, grad_b, None


class _Conv2PoolReLU(torch.autograd.Function):
    """conv2 (6 -> 16): gradients of the input, the weight and the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ops):
        y, code = ops.conv2_pool_relu(x, weight, bias)
        ctx.save_for_backward(code, x, weight)
        ctx.ops = ops
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        code, x, weight = ctx.saved_tensors
        return (*ctx.ops.conv2_pool_relu_backward(grad_y, code, x, weight), None)


def _kernel(conv: nn.Conv2d, x: torch.Tensor) -> type[torch.autograd.Function] | None:
    """The kernel for this stage and input, or None where torch's ops must run."""
    w = conv.weight
    plain = (
        x.device.type == "cpu"
        and x.dtype == w.dtype == torch.float32
        and x.dim() == 4
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and w.shape[-1] == w.shape[-2] in (3, 5)
        and min(x.shape[2:]) > w.shape[-1]
        and not torch.compiler.is_compiling()
    )
    if not plain:
        return None
    if w.shape[:2] == (6, 1) and x.shape[3] <= 32 and not x.requires_grad:
        return _Conv1PoolReLU
    if w.shape[:2] == (16, 6):
        return _Conv2PoolReLU
    return None


@functools.cache
def _ops(variant: str | None):
    return getattr(torch.ops, kernels_build.namespace(variant or cpu_variant()))


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor, variant: str | None = None) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)): a fused kernel where one applies, torch's ops elsewhere.
    `variant`: the build whose kernels run (loaded; default: this CPU's)."""
    kernel = _kernel(conv, x)
    if kernel is None:
        return torch_conv_pool_relu(conv, x)
    return kernel.apply(x, conv.weight, conv.bias, _ops(variant))
