"""Speed options keep training right: bf16 autocast, torch.compile and the fused conv1 kernel
train as well as fp32 eager on torch's ops, compiled DDP still averages gradients across real
gloo ranks, fp16 is refused on CPU with one line, and the fp16 gradient scaler unscales before
clipping and skips overflows."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.data import DistributedSampler

from pipeline import engine as engine_module
from pipeline.config import load_config
from pipeline.data.device import shard_indices
from pipeline.dist import DistContext
from pipeline.engine import Engine
from pipeline.errors import EXIT_CONFIG, ConfigError
from pipeline.model import LeNet

from conftest import (
    TINY_ARGS,
    assert_ok,
    max_diff,
    run_pipeline,
    tiny_run,
    write_tiny_mnist,
)

TOLERANCE = 0.01  # accuracy (as a fraction) a variant may differ from fp32 eager
BATCH = 512  # configs/fast_cpu.yaml's; both tests compile graphs of it, the second reuses some


@pytest.fixture(scope="module")
def inductor_env(tmp_path_factory):
    """One compile cache for this module: identical graphs are compiled once."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


def test_bf16_and_compile_reach_the_accuracy_of_fp32_eager(mnist_root, tmp_path, inductor_env):
    variants = {
        "fp32 eager, torch ops": ["train.precision=fp32", "train.fused_conv=false"],
        "fp32 eager": ["train.precision=fp32"],
        "bf16 eager": ["train.precision=bf16"],
        "fp32 compile=model": ["train.precision=fp32", "train.compile=model"],
        "bf16 compile=step": ["train.precision=bf16", "train.compile=step"],
    }

    def train(item):
        name, extra = item
        run_dir = tmp_path / name.replace(" ", "_").replace(",", "")
        # One epoch of the CPU recipe, its schedule run to the end: about 97.8% test accuracy.
        args = [
            "--config",
            "configs/fast_cpu.yaml",
            f"data.root={mnist_root}",
            "data.download=false",
            f"train.run_dir={run_dir}",
            "train.epochs=1",
            f"train.batch_size={BATCH}",
            "tracking.mode=disabled",
            *extra,
        ]
        assert_ok(run_pipeline(args, env=inductor_env))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return name, json.loads(lines[-1])["test_accuracy"]

    with ThreadPoolExecutor(2) as pool:  # one thread per process, two processes at a time
        accuracy = dict(pool.map(train, variants.items()))
    reference = accuracy["fp32 eager, torch ops"]
    assert reference >= 0.96, accuracy
    for name, value in accuracy.items():
        assert abs(value - reference) <= TOLERANCE, f"{name}: {accuracy}"


@pytest.fixture(scope="module")
def tiny_4096(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny-4096"), n_train=4096)


@pytest.fixture(scope="module")
def eager_references(tiny_4096, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eager")
    full = tiny_run(tiny_4096, tmp / "full", nproc=1, batch=2 * BATCH)
    # What a rank would end with if the all-reduce were lost: its own half batch.
    half = tiny_run(tiny_4096, tmp / "half", nproc=1, batch=BATCH)
    return full, half


@pytest.mark.parametrize("mode", ["model", "step"])
def test_compiled_ddp_on_two_ranks_matches_one_rank_eager(
    tiny_4096, tmp_path, mode, eager_references, inductor_env
):
    full, half = eager_references
    two = tiny_run(
        tiny_4096,
        tmp_path,
        nproc=2,
        batch=2 * BATCH,
        extra=[f"train.compile={mode}"],
        env=inductor_env,
    )
    # Compiled kernels round differently from eager ones, far less than a missing all-reduce.
    assert max_diff(full, half) > 1e-3
    for k in full:
        torch.testing.assert_close(two[k], full[k], rtol=1e-4, atol=2e-5, msg=k)


def test_fp16_on_cpu_is_a_one_line_config_error(tiny_mnist, tmp_path):
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={tmp_path / 'run'}",
        "train.precision=fp16",
        "dist.device=cpu",
    ]
    proc = run_pipeline(args)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.precision" in lines[0] and "bf16" in lines[0], lines


def _engine(monkeypatch, *overrides):
    cfg = load_config(None, ["optim.schedule=none", "optim.lr=0.1", *overrides])
    if cfg.train.precision == "fp16":
        # fp16 is for CUDA only; its scaler logic runs the same on CPU, so test it here.
        monkeypatch.setattr(engine_module, "check_precision", lambda *_: None)
    torch.manual_seed(0)
    return Engine(LeNet(), cfg, DistContext(), steps_per_epoch=10, total_steps=10)


def test_engine_refuses_fp16_on_cpu():
    cfg = load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision"):
        Engine(LeNet(), cfg, DistContext(), steps_per_epoch=10, total_steps=10)


def _batch():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]


def _params(e):
    return torch.cat([p.detach().flatten() for p in e.model.parameters()])


def test_fp16_scaler_clips_the_unscaled_gradients(monkeypatch):
    clip = 0.01  # far below the gradient norm of a fresh LeNet, so clipping acts
    e = _engine(monkeypatch, "train.precision=fp16", f"optim.clip_grad_norm={clip}")
    before = _params(e)
    e.train_step(_batch())
    # First SGD step: momentum buffer = gradient, so the update is lr x the clipped gradient.
    # Clipping the scaled gradient would leave an update 65536 times smaller.
    moved = (_params(e) - before).norm().item()
    assert moved == pytest.approx(0.1 * clip, rel=1e-3)


def test_fp16_scaler_skips_a_step_whose_gradients_overflow(monkeypatch):
    e = _engine(monkeypatch, "train.precision=fp16")
    e.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow
    before = _params(e)
    e.train_step(_batch())
    assert torch.equal(_params(e), before)  # skipped
    assert e.scaler.get_scale() == 2.0**39  # and the scale backed off
    assert e.finite_steps.item() == 1  # the loss itself was finite: no error for the trainer
    e.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    e.train_step(_batch())
    assert not torch.equal(_params(e), before)  # a normal step updates


@pytest.mark.parametrize("n, world", [(60000, 2), (1000, 3), (10, 4), (3, 8)])
def test_tensor_shards_are_the_distributed_samplers(n, world):
    for epoch in (0, 5):
        for rank in range(world):
            sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            assert torch.equal(shard_indices(n, rank, world, 7, epoch), torch.tensor(list(sampler)))
