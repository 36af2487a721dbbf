"""bench/gpu.sh on a machine without a GPU: `--plan` lists its parts and their time caps, which fit
the one device call the script is sized for; anything else stops at once with one line naming
CUDA. (The GPU runs themselves: tests/integration/test_cuda.py, and the script on a GPU.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, child_env

SCRIPT = REPO / "bench" / "gpu.sh"
PARTS = ["bench-fast_gpu", "train", "pytest", "bench-baseline", "torchrun"]  # most valuable first


def _gpu_sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # python3 on PATH is this interpreter: torch present, no CUDA.
    env = child_env({"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_plan_lists_the_parts_with_caps_that_fit_one_device_call(tmp_path):
    proc = _gpu_sh("--plan", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    head, *rows = proc.stdout.strip().splitlines()
    parts = [re.match(r"  (\S+) +(\d+) s  \S", row) for row in rows]
    assert all(parts), rows
    assert [p[1] for p in parts] == PARTS
    caps = [int(p[2]) for p in parts]
    assert all(cap > 0 for cap in caps) and sum(caps) <= 450, caps
    assert f"{sum(caps)} s in all" in head
    assert not any(tmp_path.iterdir())  # a plan writes nothing


@pytest.mark.parametrize("args", [["x"], []], ids=["results-dir", "no-arguments"])
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path, args):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu.sh would run the GPU checks")
    proc = _gpu_sh(*args, cwd=tmp_path)
    assert proc.returncode != 0 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "CUDA" in line and line.startswith("error: bench/gpu.sh needs CUDA: torch "), line
    assert not any(tmp_path.iterdir())  # nothing else was done
