"""A sweep as one SLURM job array: `python -m pipeline.sweep FILE --slurm [-- SBATCH OPTIONS]`.

It submits `slurm/sweep.sbatch FILE` once, as `sbatch --array=I,J,...[%K]` over the points not
finished yet; each array task runs the point of its SLURM_ARRAY_TASK_ID (`pipeline.sweep FILE
--point I`) in that point's own run directory. A task warned before its time limit checkpoints
and requeues itself alone (its own job id), and resumes; the other tasks go on untouched.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError
from pipeline.sweeps import local
from pipeline.sweeps.spec import Sweep

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "sweep.sbatch"


def array_spec(indices: list[int], max_running: int = 0) -> str:
    """sbatch's --array value: the indices (ranges where they run on), `%K` to throttle."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts) + (f"%{max_running}" if max_running > 0 else "")


def submit(sweep: Sweep, sbatch_options: list[str], max_running: int = 0) -> str | None:
    """Submit the points not finished as one array; the job id (None: nothing to do)."""
    todo = [p.index for p in sweep.points if not local.finished(p)]
    if not todo:
        return None
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs sbatch on PATH: run it on a SLURM login node")
    if not SCRIPT.is_file():
        raise ConfigError(
            f"{SCRIPT} not found: --slurm submits the repository's slurm/sweep.sbatch; run it "
            "from a checkout of the project"
        )
    cmd = [
        "sbatch",
        "--parsable",
        f"--array={array_spec(todo, max_running)}",
        *sbatch_options,
        str(SCRIPT),
        str(sweep.path.resolve()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"sbatch refused the array: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout.strip().split(";")[0]
