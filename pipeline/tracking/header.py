"""The facts of a job that a run states: the header line it starts with (versions, hardware,
world, data, W&B and TensorBoard, run directory), and the same facts for the tracker (`meta`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.dist.group import DistContext


def header(ctx: DistContext, run_dir: Path, notes: list[str], dataset: str, tracking: str) -> str:
    """The first line of a run: versions, hardware (with `notes` on CPU), world, dataset,
    `tracking` (W&B and TensorBoard: `tracker.tracking_status`) and run directory."""
    if ctx.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(ctx.device)} x{ctx.world_size}"
    else:
        threads = torch.get_num_threads()
        cpu = [f"{threads} thread{'s' if threads != 1 else ''} per rank", f"{os.cpu_count()} cores"]
        device = f"cpu ({', '.join(cpu + notes)})"
    return (
        f"lenet-ddp {__version__} | torch {torch.__version__} | python "
        f"{platform.python_version()} | {device} | world {ctx.world_size} ({ctx.launcher}, "
        f"{ctx.backend}) | data {dataset} | {tracking} | run dir {run_dir}"
    )


def meta(ctx: DistContext, dataset: str, steps_per_epoch: int, git_revision: str | None) -> dict:
    """Facts about the job that go with the config into the tracker."""
    return {
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "launcher": ctx.launcher,
        "torch_version": str(torch.__version__),
        "git_revision": git_revision,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "steps_per_epoch": steps_per_epoch,
        "dataset": dataset,
    }
