"""The GPU paths: bf16 and fp16 (gradient scaler) autocast on CUDA, the compiled CUDA-graph step
with gradient accumulation, NCCL across two GPUs, and the benchmark on a GPU. They need CUDA and
skip without it; run them on a GPU machine with `python -m pytest -q tests/test_cuda.py`."""

import json

import pytest
import torch

from conftest import assert_ok, max_diff, run_bench, run_pipeline, tiny_run, write_tiny_mnist

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = 0.01  # accuracy (as a fraction) a precision may differ from fp32


@needs_cuda
def test_bf16_and_fp16_on_cuda_reach_the_accuracy_of_fp32(mnist_root, tmp_path):
    accuracy = {}
    for precision in ("fp32", "bf16", "fp16"):
        run_dir = tmp_path / precision
        args = [
            "--config",
            "configs/fast_gpu.yaml",
            f"data.root={mnist_root}",
            "data.download=false",
            f"train.run_dir={run_dir}",
            "train.epochs=1",
            "train.compile=none",
            f"train.precision={precision}",
            "tracking.mode=disabled",
        ]
        assert_ok(run_pipeline(args))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        accuracy[precision] = json.loads(lines[-1])["test_accuracy"]
    assert accuracy["fp32"] >= 0.96, accuracy
    for name, value in accuracy.items():
        assert abs(value - accuracy["fp32"]) <= TOLERANCE, f"{name}: {accuracy}"


@pytest.fixture(scope="module")
def tiny_4096(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny-4096-cuda"), n_train=4096)


def _tiny_cuda_run(root, run_dir, nproc=1, batch=1024, extra=()):
    return tiny_run(root, run_dir, nproc, batch, [*extra, "dist.device=cuda"])


@needs_cuda
def test_cuda_graph_step_with_accumulation_matches_eager(tiny_4096, tmp_path):
    eager = _tiny_cuda_run(tiny_4096, tmp_path / "eager", extra=["train.grad_accum=2"])
    half = _tiny_cuda_run(tiny_4096, tmp_path / "half", batch=512)
    graphs = _tiny_cuda_run(
        tiny_4096,
        tmp_path / "graphs",
        extra=["train.grad_accum=2", "train.compile=model", "train.compile_mode=reduce-overhead"],
    )
    # A replay that overwrote the first micro-batch's gradients would leave the model that a
    # half batch trains; compiled kernels only round differently (TF32 convolutions included).
    assert max_diff(eager, half) > 1e-3
    assert max_diff(graphs, eager) < max_diff(eager, half) / 10


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_two_ranks_match_one_rank(tiny_4096, tmp_path):
    one = _tiny_cuda_run(tiny_4096, tmp_path / "one")
    half = _tiny_cuda_run(tiny_4096, tmp_path / "half", batch=512)
    two = _tiny_cuda_run(tiny_4096, tmp_path / "two", nproc=2)
    assert max_diff(one, half) > 1e-3
    assert max_diff(two, one) < max_diff(one, half) / 10


@needs_cuda
def test_quick_benchmark_on_cuda(mnist_root, tmp_path):
    proc = run_bench(
        [
            "--quick",
            "--device",
            "cuda",
            "--only",
            "^(baseline|pipeline) fast_gpu.yaml w1$",
            "--data-root",
            str(mnist_root),
            "--out",
            str(tmp_path),
        ],
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "cuda-quick-partial.json").read_text())
    assert "gpu" in result["machine"]
    records = {r["name"]: r for r in result["records"]}
    ours = records["pipeline fast_gpu.yaml w1"]
    assert ours["precision"] == "bf16" and ours["compile"] == "model (reduce-overhead)"
    assert ours["images_per_s"] > 0 and ours["speedup"] > 0
    assert 0.5 < ours["accuracy"][-1] <= 1.0
