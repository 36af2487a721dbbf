"""A dataset as tensors on the training device, sharded across ranks, cut into batches.

The decoded dataset is moved to the device once, normalised and padded to 32x32 there, so the
training loop never touches per-sample Python, PIL or transforms. Each epoch this rank's shard
is the one `DistributedSampler` would give (seeded, reshuffled every epoch, identical on every
rank), computed with tensor operations; it is gathered once into a buffer that is reused from
epoch to epoch, and batches are views of it. Every batch has the same shape (the ragged tail is
dropped), which is what compiled graphs and CUDA graphs need. Evaluation splits the test set so
that every image is counted exactly once across ranks.

`load_splits` is how training, evaluation and the benchmark read a dataset: the same files, the
same checks and cache, the dataset and mirrors of the run's config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config.schema import DataConfig
from pipeline.data import store
from pipeline.dist import group

MEAN, STD = 0.1307, 0.3081  # MNIST's training-set pixel statistics


def normalize_and_pad(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 32, 32] on `device`, normalised, padded by 2."""
    x = images.to(device).unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    # Pad with the normalised value of a black pixel, as Pad-then-Normalize would.
    return F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)


def load_splits(
    cfg: DataConfig,
    ctx: group.DistContext,
    splits: Sequence[str] = store.SPLITS,
    root: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """The `splits` of the configured dataset as CPU tensors on every rank (`root` instead of
    data.root where given): each node's local rank 0 checks the files, downloads the missing
    ones from data.mirrors and caches them; then every rank maps the caches."""
    where = Path(root if root is not None else cfg.root)
    return group.leader_then_all(
        ctx,
        lambda: store.prepare(
            where,
            download=cfg.download,
            dataset=cfg.dataset,
            mirrors=cfg.mirror_list(),
            splits=splits,
        ),
        lambda: store.load(where, cfg.dataset, splits),
    )


def steps_per_epoch(n: int, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of `n` training images: each rank's shard (n / world,
    rounded up) in whole micro-batches, the incomplete tail dropped."""
    return math.ceil(n / world_size) // micro_batch // grad_accum


@dataclass
class DeviceData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def to_device(raw: dict[str, torch.Tensor], device: torch.device) -> DeviceData:
    return DeviceData(
        train_x=normalize_and_pad(raw["train_images"], device),
        train_y=raw["train_labels"].to(device, torch.long),
        test_x=normalize_and_pad(raw["test_images"], device),
        test_y=raw["test_labels"].to(device, torch.long),
    )


def eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's test indices: rank, rank + world, ...; no padding, so no image counts twice."""
    return torch.arange(rank, n, world_size)


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The indices `DistributedSampler(shuffle=True, drop_last=False)` yields, as a tensor.

    The same seeded permutation, padded by wrapping around to a multiple of the world size and
    strided by rank, without a Python list of every index.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / world_size)
    total = per_rank * world_size
    if total > n:
        perm = perm.repeat(math.ceil(total / n))[:total]
    return perm[rank:total:world_size].contiguous()


class TrainBatches:
    """This rank's training batches for one epoch at a time, from the seeded shard."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
    ):
        self.x, self.y, self.micro_batch = x, y, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shard_size = math.ceil(len(y) / world_size)
        if self.shard_size < micro_batch:
            raise ValueError(
                f"each rank's shard holds {self.shard_size} images, fewer than "
                f"one batch of {micro_batch}"
            )
        # The epoch's images in shard order: allocated once, refilled every epoch.
        used = self.micro_steps_per_epoch * micro_batch
        self._xs = x.new_empty((used, *x.shape[1:]))
        self._ys = y.new_empty((used, *y.shape[1:]))

    @property
    def micro_steps_per_epoch(self) -> int:
        # The incomplete tail is dropped so that every step has the same shape on every rank.
        return self.shard_size // self.micro_batch

    def shard(self, epoch: int) -> torch.Tensor:
        return shard_indices(len(self.y), self.rank, self.world_size, self.seed, epoch)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches of `epoch`, starting at micro-step `start` (for exact resume).

        The batches are views of a buffer that the next call to `epoch` refills: use them
        before asking for the next epoch.
        """
        idx = self.shard(epoch)[: len(self._ys)].to(self.x.device)
        torch.index_select(self.x, 0, idx, out=self._xs)
        torch.index_select(self.y, 0, idx, out=self._ys)
        b = self.micro_batch
        for i in range(start, self.micro_steps_per_epoch):
            yield self._xs[i * b : (i + 1) * b], self._ys[i * b : (i + 1) * b]
