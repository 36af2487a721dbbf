"""srun's variables as the commands see them, in fresh processes: a launch error is one line
from rank 0 with exit code 6, and slurm/common.sh names the run directory an override chose.
(The mapping of srun tasks to ranks: tests/unit/test_slurm.py; the batch scripts on a real Slurm
cluster: tests/integration/test_slurm.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.errors import EXIT_DISTRIBUTED

from helpers import REPO, step_env


def test_the_cli_reports_a_launch_error_in_one_line():
    """What a user sees in the job log: one line from rank 0, exit code 6, no traceback."""
    launcher = ("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(step_env(0, CUDA_VISIBLE_DEVICES="0"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "tracking.mode=disabled"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_DISTRIBUTED, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: SLURM starts 2 tasks on node 0 but they see 1 GPU(s); use --ntasks-per-node "
        "equal to --gpus-per-node (and no --gpus-per-task or --gpu-bind, so that every task "
        "sees all GPUs of its node)"
    ], proc.stderr


def test_the_batch_scripts_name_the_run_directory_an_override_chose(tmp_path):
    """slurm/common.sh's RUN_DIR (its log lines, the requeue message) is the run's own: a
    train.run_dir among the overrides wins over the default runs/<job name>-<job id>."""
    script = (
        "set -euo pipefail\n"
        "export SLURM_JOB_ID=42 SLURM_JOB_NAME=lenet-srun SLURM_NNODES=1 "
        "SLURM_JOB_NODELIST=localhost\n"
        "scontrol() { echo localhost; }\n"  # the only Slurm command lenet_setup calls
        f"LENET_DIR={REPO}\n"
        "source slurm/common.sh\n"
        'lenet_setup configs/cpu.yaml "$@"\n'
        'echo "RUN_DIR=$RUN_DIR"\n'
    )

    def run_dir(*overrides: str) -> str:
        proc = subprocess.run(
            ["bash", "-c", script, "bash", *overrides],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    assert run_dir("train.epochs=1") == "RUN_DIR=runs/lenet-srun-42"
    assert run_dir("train.run_dir=/scratch/me/run", "train.epochs=1") == "RUN_DIR=/scratch/me/run"
