"""The fused CPU kernel of LeNet's first stage: relu(max_pool2d(conv1(x), 2)) in one pass.

`load()` builds `pipeline/csrc/conv1_pool_relu.cpp` with torch's C++ extension tooling the
first time (about 15 s; a C++ compiler and ninja are needed) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), one build per torch
version and CPU instruction set, and loads it from there afterwards. `conv1_pool_relu` is what
`LeNet` calls when the kernel is attached: it gives the values and gradients of torch's three
ops (up to float rounding) and falls back to those ops wherever the kernel does not apply:
another device or dtype, torch.compile tracing, an input that needs its own gradient. Under
bf16 autocast it still runs, in fp32 (the next layer casts its output): on this model that is
faster than torch's bf16 convolution and max-pool, and no less precise.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "conv1_pool_relu.cpp"
# Instruction sets to compile for, by torch's own reading of this CPU: a build cached for one
# CPU never runs on another that lacks its instructions (clusters share home directories).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def build_name() -> str:
    version = re.sub(r"\W", "_", torch.__version__)
    return f"lenet_conv1_pool_relu_{_isa().lower()}_torch{version}"


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / build_name()


def toolchain_problem() -> str | None:
    """Why the kernel cannot be built here (no compiler, no ninja), or None."""
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
    """Build (once) and load the kernel; None when it is ready, else why it is not."""
    if hasattr(torch.ops.lenet, "conv1_pool_relu"):
        return None
    problem = toolchain_problem()
    if problem:
        return f"{problem}; or set train.fused_conv1=false"
    from torch.utils.cpp_extension import load as load_extension

    name, directory = build_name(), build_dir()
    if not (directory / f"{name}.so").exists():
        info(f"building the fused conv1 kernel into {directory} (once, about 15 s)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        load_extension(
            name=name,
            sources=[str(SOURCE)],
            build_directory=str(directory),
            extra_cflags=[
                "-O3",
                "-fopenmp",
                *_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []),
            ],
            is_python_module=False,
        )
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use torch's ops
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{first}; or set train.fused_conv1=false"
    return None


class _Conv1PoolReLU(torch.autograd.Function):
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


def _applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    w = conv.weight
    return (
        x.device.type == "cpu"
        and x.dtype == w.dtype == torch.float32
        and x.dim() == 4
        and x.shape[1] == 1
        and x.shape[3] <= 32
        and w.shape[0] == 6
        and w.shape[-1] in (3, 5)
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and not x.requires_grad
        and not torch.compiler.is_compiling()
    )


def conv1_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)): the fused kernel where it applies, torch's ops elsewhere."""
    if _applies(conv, x):
        return _Conv1PoolReLU.apply(x, conv.weight, conv.bias)
    return F.relu(F.max_pool2d(conv(x), 2))
