"""Gradient accumulation: DDP all-reduces once per optimizer step, not once per micro-batch."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.model import LeNet
from pipeline.training.engine import Engine


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
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(counts, f)
    dist.destroy_process_group()


def test_no_sync_skips_the_allreduce_on_non_final_micro_steps(tmp_path):
    out = tmp_path / "counts.json"
    mp.spawn(_count_allreduces, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    counts = json.loads(out.read_text())
    per_step = counts["1"] / 3
    assert per_step >= 1
    assert counts["4"] == counts["1"]  # 4 micro-batches per step, still one all-reduce round
