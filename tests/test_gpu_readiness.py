"""The decisions behind the GPU paths, checked on CPU: which compile modes replay CUDA graphs,
bf16 on GPUs without it, checkpoints that hold CPU tensors and each rank's own CUDA generator,
what an NCCL failure means, the benchmark's world sizes on any number of GPUs, the warning for
a GPU machine training on CPU, the step interval's clock, and bench/gpu.sh refusing to run
without CUDA. (The GPU runs themselves are in tests/test_cuda.py.)"""

import dataclasses
import inspect

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.engine import CUDA_GRAPH_MODES, bf16_warning, uses_cuda_graphs

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# -- compile modes and CUDA graphs -----------------------------------------------------------------
def _allowed(key: str) -> tuple:
    (f,) = [f for f in dataclasses.fields(TrainConfig) if f.name == key]
    return f.metadata["choices"]


@pytest.mark.parametrize("mode", _allowed("compile_mode"))
def test_the_modes_taken_for_cuda_graphs_are_torchs_own(mode):
    """torch.compile turns CUDA graphs on for a mode through inductor's "triton.cudagraphs"
    option (max-autotune too, not only reduce-overhead); the engine then allocates gradient
    buffers outside the graphs and marks each step's start, or accumulation breaks."""
    torch_says = bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False))
    assert (mode in CUDA_GRAPH_MODES) == torch_says
    assert uses_cuda_graphs("model", mode, CUDA) == torch_says
    assert uses_cuda_graphs("step", mode, CUDA) == torch_says
    assert not uses_cuda_graphs("none", mode, CUDA)  # eager
    assert not uses_cuda_graphs("model", mode, CPU)  # no CUDA graphs on CPU


# -- bf16 on GPUs without it -----------------------------------------------------------------------
def test_bf16_on_a_gpu_without_native_bf16_is_warned_about():
    said = bf16_warning("bf16", CUDA, native_bf16=False, gpu="Tesla V100-SXM2-16GB")
    assert said is not None and "\n" not in said
    assert "Tesla V100-SXM2-16GB" in said and "train.precision=fp16" in said
    assert bf16_warning("bf16", CUDA, native_bf16=True, gpu="NVIDIA H100") is None
    assert bf16_warning("fp16", CUDA, native_bf16=False, gpu="Tesla T4") is None
    assert bf16_warning("fp32", CUDA, native_bf16=False, gpu="Tesla T4") is None
    assert bf16_warning("bf16", CPU, native_bf16=False, gpu="") is None  # CPU autocast: no GPU


def test_torch_tells_native_bf16_apart_from_emulation():
    """The engine asks `torch.cuda.is_bf16_supported(including_emulation=False)`."""
    params = inspect.signature(torch.cuda.is_bf16_supported).parameters
    assert "including_emulation" in params
    assert torch.cuda.is_bf16_supported(including_emulation=False) in (True, False)
