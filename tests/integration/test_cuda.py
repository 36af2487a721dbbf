"""The GPU paths: bf16 and fp16 (gradient scaler) autocast on CUDA, the compiled CUDA-graph step
with gradient accumulation, NCCL across two GPUs, GPU checkpoints, and the benchmark on a GPU.
Run them on a GPU machine with `python -m pytest -q tests/test_cuda.py` (or `bash bench/gpu.sh`).

When they skip and when they fail:
- No GPU (`torch.cuda.is_available()` is false): every test here skips with the reason "no GPU",
  with CI=true too. CI's CPU machines cannot run this tier; it is run on GPU machines.
- A GPU, but a prerequisite of one test missing (a second GPU, the real MNIST): helpers'
  `require()` decides, as for every other prerequisite: the test skips for a user and fails
  with CI=true, where every test that can run on the machine's kind must run.
"""

import json
import subprocess
import sys

import pytest
import torch

from helpers import (
    REPO,
    TINY_ARGS,
    assert_ok,
    child_env,
    final_model,
    max_diff,
    read_jsonl,
    require,
    run_bench,
    run_pipeline,
    tiny_run,
    write_tiny_mnist,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def gpus(n: int) -> None:
    """This test needs `n` GPUs on a machine with at least one: `require()` them."""
    if torch.cuda.device_count() < n:
        require(f"needs {n} GPUs, this machine has {torch.cuda.device_count()}")


TOLERANCE = 0.01  # accuracy (as a fraction) a precision may differ from fp32


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


@pytest.fixture(scope="module")
def graphs_run(tiny_4096, tmp_path_factory):
    """The compiled CUDA-graph step with gradient accumulation, run with inductor's CUDA-graph
    log on: the finished process and the final model."""
    run_dir = tmp_path_factory.mktemp("graphs") / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_4096}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "train.batch_size=1024",
        "optim.lr=0.1",
        "train.grad_accum=2",
        "train.compile=model",
        "train.compile_mode=reduce-overhead",
        "dist.device=cuda",
    ]
    proc = run_pipeline(args, env={"TORCH_LOGS": "cudagraphs"})
    assert_ok(proc)
    return proc, {k: v.float() for k, v in final_model(run_dir).items()}


def test_cuda_graph_step_with_accumulation_matches_eager(tiny_4096, graphs_run, tmp_path):
    eager = _tiny_cuda_run(tiny_4096, tmp_path / "eager", extra=["train.grad_accum=2"])
    half = _tiny_cuda_run(tiny_4096, tmp_path / "half", batch=512)
    graphs = graphs_run[1]
    # A replay that overwrote the first micro-batch's gradients would leave the model that a
    # half batch trains; compiled kernels only round differently (TF32 convolutions included).
    assert max_diff(eager, half) > 1e-3
    assert max_diff(graphs, eager) < max_diff(eager, half) / 10


def test_the_compiled_step_records_and_replays_cuda_graphs(graphs_run):
    """Inductor falls back to plain kernels, saying "skipping cudagraphs due to ...", where a
    graph cannot be captured (a CPU tensor, a mutated input, a dynamic shape)."""
    log = graphs_run[0].stderr
    skips = [line for line in log.splitlines() if "skipping cudagraphs" in line]
    assert not skips, "\n".join(skips)
    assert "Recording function" in log, log[-3000:]  # inductor's CUDA-graph trees recorded


def test_nccl_two_ranks_match_one_rank(tiny_4096, tmp_path):
    gpus(2)
    one = _tiny_cuda_run(tiny_4096, tmp_path / "one")
    half = _tiny_cuda_run(tiny_4096, tmp_path / "half", batch=512)
    two = _tiny_cuda_run(tiny_4096, tmp_path / "two", nproc=2)
    assert max_diff(one, half) > 1e-3
    assert max_diff(two, one) < max_diff(one, half) / 10


def _steps(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "steps.jsonl")}


def test_the_gpu_recipe_with_ddp_and_accumulation_trains_like_eager(mnist_root, tmp_path):
    """configs/fast_gpu.yaml as it is (bf16, the DDP model compiled with CUDA graphs) on two
    GPUs with two micro-steps per step, against the same run eager: the same losses, up to
    rounding."""
    gpus(2)
    args = [
        "--config",
        "configs/fast_gpu.yaml",
        f"data.root={mnist_root}",
        "data.download=false",
        "tracking.mode=disabled",
        "train.grad_accum=2",
        "train.max_steps=40",
        "train.log_every=5",
    ]
    for name, extra in (("graphs", []), ("eager", ["train.compile=none"])):
        assert_ok(run_pipeline([*args, f"train.run_dir={tmp_path / name}", *extra], nproc=2))
    graphs, eager = _steps(tmp_path / "graphs"), _steps(tmp_path / "eager")
    assert graphs.keys() == eager.keys() == set(range(5, 41, 5))
    for step in graphs:
        assert abs(graphs[step] - eager[step]) < 0.05, (step, graphs, eager)
    assert graphs[40] < 0.5 * graphs[5], graphs  # it learns


def test_fp16_with_clipping_and_accumulation_reaches_the_accuracy_of_fp32(mnist_root, tmp_path):
    """The gradient scaler with clipping and two micro-steps: gradients clipped while still
    scaled (by 2**16) would barely move the model (10% accuracy); unscaled first, one epoch of
    configs/mnist_lenet.yaml reaches about 98%, as in fp32."""
    run_dir = tmp_path / "fp16"
    args = [
        "--config",
        "configs/mnist_lenet.yaml",
        f"data.root={mnist_root}",
        "data.download=false",
        f"train.run_dir={run_dir}",
        "tracking.mode=disabled",
        "train.epochs=1",
        "train.precision=fp16",
        "train.grad_accum=2",
        "optim.clip_grad_norm=1.0",
        "dist.device=cuda",
    ]
    assert_ok(run_pipeline(args))
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["test_accuracy"] >= 0.97


@pytest.fixture(scope="module")
def gpu_checkpoint(tiny_4096, tmp_path_factory):
    """A run directory whose run stopped at train.max_steps=4 (the end of its first epoch of
    two) on the GPU, with its checkpoint."""
    run_dir = tmp_path_factory.mktemp("gpu-ckpt") / "run"
    _tiny_cuda_run(tiny_4096, run_dir, extra=["train.max_steps=4"])
    return run_dir


def test_a_gpu_checkpoint_opens_with_plain_torch_load_without_cuda(gpu_checkpoint):
    """Every tensor of a GPU run's checkpoint is saved on the CPU: a machine without CUDA opens
    it with plain torch.load(path, weights_only=True), no map_location."""
    from pipeline.training import checkpoint

    (path,) = checkpoint.list_checkpoints(gpu_checkpoint)
    script = """
import sys, torch
state = torch.load(sys.argv[1], weights_only=True)
found = []
def walk(x):
    if isinstance(x, torch.Tensor):
        found.append(x.device.type)
    elif isinstance(x, dict):
        [walk(v) for v in x.values()]
    elif isinstance(x, (list, tuple)):
        [walk(v) for v in x]
walk(state)
assert not torch.cuda.is_available()
print(len(found), sorted(set(found)))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPO,
        env=child_env({"CUDA_VISIBLE_DEVICES": ""}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, devices = proc.stdout.split(" ", 1)
    assert int(count) > 10 and devices.strip() == "['cpu']", proc.stdout


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
