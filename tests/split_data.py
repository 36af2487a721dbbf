"""Tiny MNIST-format datasets for the tests of the validation split, selection and early stopping.

- `write_indexed_mnist`: every training image carries its own index in its first two pixels
  (`decode_indices` reads them back from a batch as training receives it), so a test can tell
  which images a rank trained on.
- `write_misleading_mnist`: the images that `data.val_size` holds out are labelled as the next
  class, so the more the model learns, the worse its validation loss: the best epoch comes
  early and early stopping has something to stop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.catalog import FILES
from pipeline.data.device import MEAN, STD
from pipeline.data.split import split

from helpers import write_idx


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Learnable: each class lights up its own band of rows, plus noise (conftest's recipe)."""
    images = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 7, 4:24] = 250
    return images


def _write(root: Path, train: tuple, test: tuple) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in (("train", train), ("test", test)):
        write_idx(raw / FILES[(name, "images")], images)
        write_idx(raw / FILES[(name, "labels")], labels)
    return root


def write_indexed_mnist(root: Path, n_train: int = 512, n_test: int = 128) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_train, dtype=np.uint8)
    images = _images(rng, labels)
    index = np.arange(n_train)
    images[:, 0, 0], images[:, 0, 1] = index // 256, index % 256
    test_labels = rng.integers(0, 10, n_test, dtype=np.uint8)
    return _write(root, (images, labels), (_images(rng, test_labels), test_labels))


def decode_indices(x: torch.Tensor) -> list[int]:
    """The indices a batch of `write_indexed_mnist` images carry, as training receives them
    (normalised, padded by 2)."""
    pixels = ((x[:, 0, 2, 2:4].double() * STD + MEAN) * 255).round().long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def write_misleading_mnist(root: Path, val_size: int, n_train: int = 512, n_test: int = 128):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, n_train, dtype=np.uint8)
    images = _images(rng, labels)
    held_out = split(n_train, val_size).val.numpy()
    labels[held_out] = (labels[held_out] + 1) % 10
    test_labels = rng.integers(0, 10, n_test, dtype=np.uint8)
    return _write(root, (images, labels), (_images(rng, test_labels), test_labels))
