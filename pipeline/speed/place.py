"""The one way the rest of the package reaches the speed work: `place_model` puts a model on its
device as training runs it, with the CPU's allocator setting and the conv path of
`train.fused_conv` (torch's ops, or the fused kernels of `kernels.py` where they are asked for or,
with `auto`, faster here), and on GPUs cuDNN's autotuner. Training, evaluation and the benchmark
all prepare their model here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.speed import kernels
from pipeline.speed.cpu_memory import reuse_freed_memory

log = logging.getLogger(__name__)


def place_model(
    model: nn.Module, cfg: Config, device: torch.device, batch: int
) -> tuple[bool, str, list[str]]:
    """Put `model` on `device`: channels-last; on CUDA, cuDNN's autotuner on; on CPU, malloc
    set to keep freed memory where `train.reuse_host_memory` asks for it, and the fused conv
    kernels where `train.fused_conv` asks for them (`auto`: where they are faster here, see
    `kernels.choose`; `batch` is the images of one forward pass on this rank). Returns whether
    the kernels run, the conv path and why in words, and the run header's notes (CPU runs)."""
    notes = []
    if device.type == "cpu" and cfg.train.reuse_host_memory and reuse_freed_memory():
        notes.append("memory reused between steps")
    # NHWC convolutions: oneDNN (CPU) and cuDNN run them without reordering the tensors on
    # every call; the values are those of the plain layout, up to rounding.
    model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        # Every batch has one shape (the data drops the ragged tail): cuDNN times its
        # convolution algorithms once per shape and keeps the fastest.
        torch.backends.cudnn.benchmark = True
    fused, why = kernels.choose(
        cfg.train.fused_conv, batch, cfg.model.kernel_size, cfg.train.precision, device
    )
    if fused:
        model.conv_pool_relu = kernels.conv_pool_relu
        if cfg.train.compile != "none":  # Dynamo cannot trace them: it compiles torch's ops
            why += f"; the train.compile={cfg.train.compile} step traces torch's ops instead"
    elif kernels.UNAVAILABLE in why:
        log.warning(why)
    if device.type == "cpu":
        notes.append(why)
    return fused, why, notes
