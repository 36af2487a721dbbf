"""Sharding: training shards are disjoint and cover the set; evaluation counts each image once."""

import pytest
import torch

from pipeline.data.device import TrainBatches, eval_indices


def _batches(n: int, rank: int, world: int, micro: int = 8, seed: int = 0) -> TrainBatches:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return TrainBatches(x, torch.arange(n), micro, rank, world, seed)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_shards_are_disjoint_and_cover_the_set(world):
    n = 60000
    shards = [_batches(n, r, world).shard(epoch=0) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    union = torch.cat(shards)
    assert len(torch.unique(union)) == n  # disjoint and complete


def test_every_rank_reshuffles_each_epoch_alike():
    a0, a1 = _batches(1000, 0, 2).shard(0), _batches(1000, 0, 2).shard(1)
    assert not torch.equal(a0, a1)  # set_epoch changes the order
    assert torch.equal(a0, _batches(1000, 0, 2).shard(0))  # same seed, same order
    assert not torch.equal(a0, _batches(1000, 0, 2, seed=1).shard(0))


def test_batches_come_from_this_ranks_shard_in_order():
    b = _batches(96, rank=1, world=2, micro=8)
    shard = b.shard(epoch=3)
    got = torch.cat([y for _, y in b.epoch(3)])
    assert torch.equal(got, shard[: b.micro_steps_per_epoch * 8])
    resumed = torch.cat([y for _, y in b.epoch(3, start=2)])
    assert torch.equal(resumed, got[16:])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_counts_each_test_image_exactly_once(world):
    n = 10000
    parts = [eval_indices(n, r, world) for r in range(world)]
    counts = torch.bincount(torch.cat(parts), minlength=n)
    assert torch.all(counts == 1)
