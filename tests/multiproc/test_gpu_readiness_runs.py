"""The GPU paths' decisions on real CPU processes: a real run's checkpoint holds CPU tensors only;
the benchmark and bench/gpu.sh refuse CUDA without a GPU at once, in one line. (The decisions in
this process: tests/unit/test_cuda.py; the GPU runs: tests/integration/test_cuda.py.)"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, child_env, run_pipeline


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
    assert_ok(run_pipeline(_args(tiny_mnist, run_dir, "train.max_steps=8", "dist.device=cpu")))
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


# -- bench/gpu.sh without CUDA ---------------------------------------------------------------------
def test_gpu_script_refuses_at_once_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu.sh would run the GPU checks")
    results = tmp_path / "results"
    # python3 on PATH is this interpreter: torch present, no CUDA.
    env = child_env({"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), str(results)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and time.monotonic() - started < 60
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: bench/gpu.sh needs CUDA: torch ") and "finds no GPU" in line
    assert proc.stdout == "" and not results.exists()  # nothing else was done
