"""The GPU paths' decisions on real CPU processes: a real run's checkpoint holds CPU tensors only;
the benchmark and bench/gpu.sh refuse CUDA without a GPU at once, in one line; `bash bench/gpu.sh
--plan` lists its parts and their time caps, which fit the one device call the script is sized
for. (The decisions in this process: tests/unit/test_cuda.py; the GPU runs:
tests/integration/test_cuda.py, and the script on a GPU.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, child_env, train_here

# -- a CPU run, the benchmark ---------------------------------------------------------------------


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _args(root, run_dir, *extra):
    return [*TINY_ARGS, f"data.root={root}", f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def cpu_run(tiny_mnist, tmp_path_factory) -> Path:
    """A real CPU run, stopped at train.max_steps=8 of its 16 with a checkpoint."""
    run_dir = tmp_path_factory.mktemp("cpu-run") / "run"
    assert_ok(train_here(_args(tiny_mnist, run_dir, "train.max_steps=8", "dist.device=cpu")))
    return run_dir


def test_a_real_runs_checkpoint_holds_cpu_tensors_only(cpu_run):
    (path,) = checkpoint.list_checkpoints(cpu_run)
    state = torch.load(path, weights_only=True)  # plain torch, no map_location
    found = list(_tensors(state))
    assert len(found) > 10 and {t.device.type for t in found} == {"cpu"}
    assert state["rng"][0]["cuda"] == []  # a CPU rank has no CUDA generator to keep


def test_bench_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "--device", "cuda", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--device cuda" in proc.stderr and "finds no GPU" in proc.stderr


# -- bench/gpu.sh, the device script --------------------------------------------------------------


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
