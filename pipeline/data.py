"""MNIST as tensors on the training device, sharded across ranks, cut into batches.

The decoded dataset is moved to the device once, normalised and padded to 32x32 there, so the
training loop never touches per-sample Python, PIL or transforms. Each epoch a
`DistributedSampler` (seeded, `set_epoch` every epoch, identical on every rank) picks this
rank's shard; the shard is gathered once into a contiguous tensor and batches are views of it.
Evaluation splits the test set so that every image is counted exactly once across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

MEAN, STD = 0.1307, 0.3081  # MNIST's training-set pixel statistics


def normalize_and_pad(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 32, 32] on `device`, normalised, padded by 2."""
    x = images.to(device).unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    # Pad with the normalised value of a black pixel, as Pad-then-Normalize would.
    return F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)


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
        self.sampler = DistributedSampler(
            range(len(y)),
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        if len(self.sampler) < micro_batch:
            raise ValueError(
                f"each rank's shard holds {len(self.sampler)} images, fewer than "
                f"one batch of {micro_batch}"
            )

    @property
    def micro_steps_per_epoch(self) -> int:
        # The incomplete tail is dropped so that every step has the same shape on every rank.
        return len(self.sampler) // self.micro_batch

    def shard(self, epoch: int) -> torch.Tensor:
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.long)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches of `epoch`, starting at micro-step `start` (for exact resume)."""
        idx = self.shard(epoch)[: self.micro_steps_per_epoch * self.micro_batch]
        idx = idx.to(self.x.device)
        xs, ys = self.x.index_select(0, idx), self.y.index_select(0, idx)
        b = self.micro_batch
        for i in range(start, self.micro_steps_per_epoch):
            yield xs[i * b : (i + 1) * b], ys[i * b : (i + 1) * b]
