"""Fused CPU kernels for LeNet's two stages: relu(max_pool2d(conv(x), 2)), each in one pass.

`load()` builds `pipeline/csrc/` with torch's C++ extension tooling the first time (about
20 s; a C++ compiler is needed, and ninja, which the project depends on) into torch's
extension cache (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), one build
per torch installation and CPU instruction set, and loads it from there afterwards.
`conv_pool_relu` is what `LeNet` calls for each stage when the kernels are attached: it gives
the values and gradients of torch's three ops (up to float rounding) and falls back to those
ops wherever a kernel does not apply: another device, dtype or shape, torch.compile tracing,
conv1's input needing its own gradient. Under bf16 autocast the kernels still run, in fp32 (the
next layer casts their output): on LeNet that is faster than torch's bf16 ops, and no less
precise.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.errors import describe
from pipeline.model import conv_pool_relu as torch_conv_pool_relu

CSRC = Path(__file__).with_name("csrc")
# Instruction sets to compile for, by torch's own reading of this CPU: a build cached for one
# CPU never runs on another that lacks its instructions (clusters share home directories).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def build_name() -> str:
    """One name per torch version, torch installation and CPU instruction set: environments
    that share a home directory never rebuild over each other's kernels."""
    version = re.sub(r"\W", "_", torch.__version__)
    install = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    return f"lenet_conv_pool_relu_{_isa().lower()}_torch{version}_{install}"


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / build_name()


def toolchain_problem() -> str | None:
    """Why the kernels cannot be built here (no compiler, no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI wheel: its binary is not on PATH outside an activated venv
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def load(info: Callable[[str], None] = lambda _: None) -> str | None:
    """Build (once) and load the kernels; None when they are ready, else why they are not."""
    if hasattr(torch.ops.lenet, "conv2_pool_relu"):
        return None
    problem = toolchain_problem()
    if problem:
        return f"{problem}; or set train.fused_conv=false"
    from torch.utils.cpp_extension import load as load_extension

    name, directory = build_name(), build_dir()
    if not (directory / f"{name}.so").exists():
        info(f"building the fused conv kernels into {directory} (once, about 20 s)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        load_extension(
            name=name,
            sources=[str(s) for s in sorted(CSRC.glob("*.cpp"))],
            build_directory=str(directory),
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(_isa(), [])],
            is_python_module=False,
        )
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use torch's ops
        return f"{describe(e)}; or set train.fused_conv=false"
    return None


class _Conv1PoolReLU(torch.autograd.Function):
    """conv1 (1 -> 6): the input's gradient is never needed, only the weight's and bias's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y, code = torch.ops.lenet.conv1_pool_relu(x, weight, bias)
        ctx.save_for_backward(code, x)
        ctx.kernel_size = weight.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        code, x = ctx.saved_tensors
        grad_w, grad_b = torch.ops.lenet.conv1_pool_relu_backward(grad_y, code, x, ctx.kernel_size)
        return None, grad_w, grad_b


class _Conv2PoolReLU(torch.autograd.Function):
    """conv2 (6 -> 16): gradients of the input, the weight and the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y, code = torch.ops.lenet.conv2_pool_relu(x, weight, bias)
        ctx.save_for_backward(code, x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        code, x, weight = ctx.saved_tensors
        return tuple(torch.ops.lenet.conv2_pool_relu_backward(grad_y, code, x, weight))


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


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)): a fused kernel where one applies, torch's ops elsewhere."""
    kernel = _kernel(conv, x)
    if kernel is None:
        return torch_conv_pool_relu(conv, x)
    return kernel.apply(x, conv.weight, conv.bias)
