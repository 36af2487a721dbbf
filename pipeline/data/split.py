"""The validation split: `data.val_size` training images held out to select the model.

The held-out images are the first `val_size` of one seeded permutation of the training set's
indices, seeded by `SPLIT_SEED`, a constant, not by train.seed: the split depends on nothing but
the dataset's size and val_size, so it is the same on every rank, on every world size, on
resume, and for every seed of a sweep (runs of different seeds are selected on the same
images). The remaining images, in file order, are the training set that the sampler shards
(`pipeline.data.device.shard_indices`: what `DistributedSampler` gives on that subset), so no
held-out image is ever trained on.

`Split.record()` is what a run writes to RUN_DIR/split.json and into each checkpoint: the sizes,
the seed, and a SHA-256 of the held-out indices (sorted, as little-endian int64), which a resume
compares so that it never continues a run on other held-out images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SPLIT_SEED = 20_240_601  # a constant of the project: changing it changes every run's split


@dataclass
class Split:
    """Which training images are trained on and which are held out (indices, sorted)."""

    train: torch.Tensor
    val: torch.Tensor
    seed: int = SPLIT_SEED

    def record(self) -> dict:
        return {
            "val_size": len(self.val),
            "train_size": len(self.train),
            "seed": self.seed,
            "val_digest": digest(self.val),
        }


def digest(indices: torch.Tensor) -> str:
    """SHA-256 of `indices` as little-endian int64."""
    return hashlib.sha256(indices.numpy().astype("<i8").tobytes()).hexdigest()


def split(n: int, val_size: int, seed: int = SPLIT_SEED) -> Split:
    """Hold out `val_size` of the `n` training images (0: none, every image is trained on)."""
    if val_size == 0:
        return Split(torch.arange(n), torch.arange(0), seed)
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val, train = perm[:val_size], perm[val_size:]
    return Split(train.sort().values, val.sort().values, seed)


def check_size(n: int, val_size: int, batch_size: int) -> str | None:
    """Why `val_size` cannot be held out of `n` images with global batch `batch_size` (None: it
    can): at least one global batch must be left to train on."""
    if n - val_size >= batch_size:
        return None
    most = max(0, n - batch_size)
    return (
        f"config key data.val_size: {val_size} leaves {max(0, n - val_size)} of the {n} "
        f"training images to train on, fewer than one global batch (train.batch_size="
        f"{batch_size}); use at most {most}"
    )


def apply(raw: dict[str, torch.Tensor], s: Split) -> dict[str, torch.Tensor]:
    """`raw` (the uint8 splits of `pipeline.data.store`) with its training images cut into
    the trained ones (`train_*`) and the held-out ones (`val_*`, absent without a split)."""
    if len(s.val) == 0:
        return raw
    out = dict(raw)
    for kind in ("images", "labels"):
        full = raw[f"train_{kind}"]
        out[f"train_{kind}"] = full[s.train]
        out[f"val_{kind}"] = full[s.val]
    return out


def same_split(a: dict, b: dict) -> bool:
    """Whether two split records hold out the same images."""
    return a["val_size"] == b["val_size"] and (
        b["val_size"] == 0 or a["val_digest"] == b["val_digest"]
    )
