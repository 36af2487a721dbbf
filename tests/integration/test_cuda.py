"""The GPU paths: bf16 and fp16 (gradient scaler) autocast on CUDA, the compiled CUDA-graph step
with and without gradient accumulation, the whole step as one CUDA graph
(train.cuda_graph=whole_step), NCCL across two GPUs (and a peer hung at a read-back), GPU
checkpoints, and the benchmark on a GPU (and in fp16).
Run them on a GPU machine with `python -m pytest -q tests/integration/test_cuda.py` (or
`bash bench/gpu.sh`).

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

from pipeline.errors import EXIT_DISTRIBUTED

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


def test_a_peer_hung_at_the_loss_read_back_ends_the_job_after_dist_timeout_s(tiny_4096, tmp_path):
    """Rank 1 hangs after step 3; rank 0 waits for its loss's NCCL sum on the host, not inside
    CUDA, and ends the job with the collective-timeout line and exit 6 after dist.timeout_s
    (NCCL's watchdog would end it only after 2 x dist.timeout_s, with SIGABRT)."""
    gpus(2)
    args = [
        *TINY_ARGS,
        f"data.root={tiny_4096}",
        f"train.run_dir={tmp_path / 'run'}",
        "train.log_every=1",  # a read-back after every step
        "train.stop_check_every=1000",  # no control collective meets the hang first
        "dist.timeout_s=20",
        "dist.device=cuda",
        "--nproc-per-node=2",
    ]
    proc = run_pipeline(args, faults=["--fail-rank", "1", "--fail-step", "3", "--hang"])
    assert proc.returncode == EXIT_DISTRIBUTED, proc.stderr[-3000:]
    assert "fault: rank 1 hangs at step 3" in proc.stderr
    assert (
        "a collective waited more than dist.timeout_s=20 s for a peer rank that stopped "
        "responding (an NCCL all-reduce whose sum this rank reads)" in proc.stderr
    ), proc.stderr[-3000:]


def _steps(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "steps.jsonl")}


@pytest.mark.parametrize("nproc, accum", [(2, 2), (1, 1)])
def test_the_gpu_recipe_trains_like_eager(mnist_root, tmp_path, nproc, accum):
    """configs/fast_gpu.yaml (bf16, the model compiled with CUDA graphs) against the same run
    eager: the same losses, up to rounding. On two GPUs (DDP) with two micro-steps per step; on
    one GPU as shipped, one micro-step, whose gradients the optimizer takes straight from the
    graphs' pool, with no buffers of the engine's own."""
    gpus(nproc)
    args = [
        "--config",
        "configs/fast_gpu.yaml",
        f"data.root={mnist_root}",
        "data.download=false",
        "tracking.mode=disabled",
        f"train.grad_accum={accum}",
        "train.max_steps=40",
        "train.log_every=5",
    ]
    for name, extra in (("graphs", []), ("eager", ["train.compile=none"])):
        assert_ok(run_pipeline([*args, f"train.run_dir={tmp_path / name}", *extra], nproc=nproc))
    graphs, eager = _steps(tmp_path / "graphs"), _steps(tmp_path / "eager")
    assert graphs.keys() == eager.keys() == set(range(5, 41, 5))
    for step in graphs:
        assert abs(graphs[step] - eager[step]) < 0.05, (step, graphs, eager)
    assert graphs[40] < 0.5 * graphs[5], graphs  # it learns


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.precision=fp32", "optim.name=nesterov"],
        ["train.precision=bf16", "optim.name=adam", "optim.lr=0.003", "optim.clip_grad_norm=1"],
        ["train.precision=fp32", "optim.name=sgd", "train.grad_accum=2"],
    ],
)
def test_the_whole_step_graph_replays_the_eager_whole_step(overrides):
    """train.cuda_graph=whole_step in this process on one GPU, 10 steps: 3 eager on a side
    stream, the 4th captured, then replayed, against the same static-buffer step run eagerly
    throughout (capture turned off). The same kernels on the same values, but not bit for bit:
    cuDNN may pick nondeterministic (atomic) algorithms for the convolutions' weight gradients
    and cuBLAS another workspace under capture, so the runs agree to a hundredth of what the
    six replayed steps moved the weights (a replay with a stale rate or stale inputs, or none,
    would differ by a good part of it)."""
    from pipeline.config.schema import load_config
    from pipeline.dist.group import DistContext
    from pipeline.model import LeNet
    from pipeline.training.engine import CAPTURE_AFTER, Engine

    cfg = load_config(
        None,
        [
            "train.cuda_graph=whole_step",
            "train.batch_size=64",
            "optim.schedule=cosine",
            "optim.warmup_epochs=1",
            *overrides,
        ],
    )
    ctx = DistContext(device=torch.device("cuda", torch.cuda.current_device()))
    g = torch.Generator(device=ctx.device).manual_seed(0)
    per = 64 // cfg.train.grad_accum
    batches = [
        [
            (
                torch.randn(per, 1, 32, 32, device=ctx.device, generator=g),
                torch.randint(0, 10, (per,), device=ctx.device, generator=g),
            )
            for _ in range(cfg.train.grad_accum)
        ]
        for _ in range(10)
    ]
    engines = []
    for capture in (True, False):
        torch.manual_seed(0)
        engine = Engine(LeNet(), cfg, ctx, steps_per_epoch=4, total_steps=10)
        engine.whole_step.capture = capture
        engines.append(engine)
    graphed, eager = engines
    for i, batch in enumerate(batches):
        for engine in engines:
            engine.train_step(batch)
        if i == CAPTURE_AFTER:
            at_capture = {k: v.clone() for k, v in graphed.model.state_dict().items()}
    assert graphed.whole_step.graph is not None and eager.whole_step.graph is None
    final = graphed.model.state_dict()
    moved = max_diff(final, at_capture)
    assert moved > 1e-3  # the replays trained
    assert max_diff(final, eager.model.state_dict()) < moved / 100, moved
    torch.testing.assert_close(graphed.loss_sum, eager.loss_sum, rtol=1e-3, atol=0)


def _torchrun_one_gpu(args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=1 -m pipeline.train ARGS`: the NCCL group of one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    proc = subprocess.run(
        [*cmd, "-m", "pipeline.train", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_ok(proc)
    return proc


def test_the_headline_command_with_the_whole_step_graph_trains_like_eager(mnist_root, tmp_path):
    """`torchrun --nproc_per_node=1 -m pipeline.train --config mnist_lenet` (the whole step
    captured once, its all-reduce-free step replayed beside NCCL's watchdog) against the same
    command eager, 100 steps on the real MNIST: the same losses, up to rounding."""
    args = [
        "--config",
        "mnist_lenet",
        f"data.root={mnist_root}",
        "data.download=false",
        "tracking.mode=disabled",
        "train.max_steps=100",
        "train.log_every=20",
    ]
    graph = _torchrun_one_gpu(
        [*args, f"train.run_dir={tmp_path / 'graph'}", "train.cuda_graph=whole_step"]
    )
    _torchrun_one_gpu([*args, f"train.run_dir={tmp_path / 'eager'}"])
    assert "captured the whole step as one CUDA graph after 3 eager steps" in graph.stdout
    graphs, eager = _steps(tmp_path / "graph"), _steps(tmp_path / "eager")
    assert graphs.keys() == eager.keys() == set(range(20, 101, 20))
    for step in graphs:
        assert abs(graphs[step] - eager[step]) < 0.05, (step, graphs, eager)
    assert graphs[100] < 0.5 * graphs[20], graphs  # it learns


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


def _quick_cuda_bench(mnist_root, out, only: str, extra: list[str], timeout: float) -> dict:
    """`python -m pipeline.bench --quick --device cuda --only ONLY EXTRA...`: its result."""
    args = ["--quick", "--device", "cuda", "--only", only, *extra]
    proc = run_bench([*args, "--data-root", str(mnist_root), "--out", str(out)], timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "cuda-quick-partial.json").read_text())


def test_quick_benchmark_in_fp16_on_cuda(mnist_root, tmp_path):
    """`python -m pipeline.bench --device cuda --set train.precision=fp16 --quick`: the gradient
    scaler's step, timed by the benchmark, trains."""
    extra = ["--set", "train.precision=fp16"]
    result = _quick_cuda_bench(mnist_root, tmp_path, "^pipeline mnist_lenet.yaml w1$", extra, 600)
    (ours,) = result["records"]
    assert ours["name"] == "pipeline mnist_lenet.yaml w1" and ours["precision"] == "fp16"
    assert ours["images_per_s"] > 0
    assert 0.5 < ours["accuracy"][-1] <= 1.0


def test_quick_benchmark_on_cuda(mnist_root, tmp_path):
    result = _quick_cuda_bench(
        mnist_root, tmp_path, "^(baseline|pipeline) fast_gpu.yaml w1$", [], 1200
    )
    assert "gpu" in result["machine"]
    records = {r["name"]: r for r in result["records"]}
    ours = records["pipeline fast_gpu.yaml w1"]
    assert ours["precision"] == "bf16" and ours["compile"] == "model (reduce-overhead)"
    assert ours["images_per_s"] > 0 and ours["speedup"] > 0
    assert 0.5 < ours["accuracy"][-1] <= 1.0
