"""DDP is wired right, on real gloo ranks: two ranks with batch B each match one rank with batch
2B, gradient accumulation too; DDP all-reduces once per optimizer step, not once per micro-batch;
compiled DDP (the model, or the whole step) on two ranks still averages gradients, ending where
one rank eager does. (torch.compile on CPU compiles C++: a compiler is needed, as CI installs.
fp16 refused on CPU: tests/unit/test_speed.py.)"""

import gc
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.model import LeNet
from pipeline.training.engine import Engine

from helpers import (
    TINY_ARGS,
    assert_ok,
    final_model,
    max_diff,
    run_ranks,
    tiny_run,
    write_tiny_mnist,
)

# -- two ranks against one ------------------------------------------------------------------------


STEPS = 8


def _train(tiny_mnist, run_dir, nproc, batch, extra=()):
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        f"train.batch_size={batch}",
        f"train.max_steps={STEPS}",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        *extra,
    ]
    assert_ok(run_ranks(args, nproc))
    return final_model(run_dir)


@pytest.fixture(scope="module")
def two_ranks(tiny_mnist, tmp_path_factory) -> dict:
    """Two ranks at a global batch of 64 (32 each): the run both comparisons below start from."""
    return _train(tiny_mnist, tmp_path_factory.mktemp("ddp") / "two", nproc=2, batch=64)


def test_two_ranks_match_one_rank_with_the_global_batch(tiny_mnist, tmp_path, two_ranks):
    one = _train(tiny_mnist, tmp_path / "one", nproc=1, batch=64)
    for k in one:
        torch.testing.assert_close(two_ranks[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    # The comparison is sensitive: half the batch (other samples, other gradients) drifts far
    # beyond the tolerance, as would summed instead of averaged gradients.
    half = _train(tiny_mnist, tmp_path / "half", nproc=1, batch=32)
    assert max_diff(one, half) > 1e-3


def test_gradient_accumulation_matches_the_full_batch(tiny_mnist, tmp_path, two_ranks):
    accum = _train(
        tiny_mnist, tmp_path / "accum", nproc=2, batch=64, extra=["train.grad_accum=2"]
    )  # 2 ranks x 2 micro-steps x 16
    for k in two_ranks:
        torch.testing.assert_close(accum[k], two_ranks[k], rtol=1e-5, atol=1e-6, msg=k)


# -- gradient accumulation ------------------------------------------------------------------------


def _count_allreduces(rank: int, store_path: str, out_path: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    counts = {}
    for accum in (1, 4):
        cfg = load_config(None, [f"train.grad_accum={accum}", "train.batch_size=64"])
        ctx = DistContext(rank=rank, world_size=2, local_rank=rank, local_world_size=2)
        torch.manual_seed(0)
        engine = Engine(LeNet(), cfg, ctx, steps_per_epoch=10, total_steps=10)
        calls = []

        def hook(state, bucket, calls=calls):
            calls.append(1)
            fut = dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        engine.ddp.register_comm_hook(None, hook)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            micro = [
                (torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
                for _ in range(accum)
            ]
            engine.train_step(micro)
        counts[accum] = len(calls)
        # Its DDP holds the process group and a Python hook: freed now, on both ranks, not at
        # the interpreter's exit after the group is gone.
        del engine, hook
        gc.collect()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(counts, f)
    dist.barrier()
    dist.destroy_process_group()


def test_no_sync_skips_the_allreduce_on_non_final_micro_steps(tmp_path):
    out = tmp_path / "counts.json"
    mp.spawn(_count_allreduces, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    counts = json.loads(out.read_text())
    per_step = counts["1"] / 3
    assert per_step >= 1
    assert counts["4"] == counts["1"]  # 4 micro-batches per step, still one all-reduce round


# -- torch.compile under DDP ----------------------------------------------------------------------


BATCH = 512  # configs/fast_cpu.yaml's; both modes compile graphs of it, the second reuses some


@pytest.fixture(scope="module")
def inductor_env(tmp_path_factory):
    """One compile cache for this module: identical graphs are compiled once."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


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
