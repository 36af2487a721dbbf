"""The real MNIST (the `mnist_root` fixture): every file has the canonical count and is held to
its canonical MD5, the cache is written once and reused, and the arrays have MNIST's shapes and
all ten labels. It skips with the reason where the data is not found, and fails in CI. (The IDX
reader and the cache on tiny files: tests/unit/test_mnist.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data import store
from pipeline.data.catalog import CANONICAL, FILES
from pipeline.data.store import load, prepare, raw_dir

from helpers import count_decodes, identity, require


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback cache lives under $XDG_CACHE_HOME: keep tests out of the real ~/.cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _either_form(raw: Path, name: str) -> Path | None:
    """`name` in `raw`, gzipped or not (the pipeline reads either), or None."""
    return next((p for p in (raw / f"{name}.gz", raw / name) if p.is_file()), None)


def test_real_mnist(mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = raw_dir(mnist_root)
    found = {name: _either_form(raw, name) for name in FILES.values()}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        require(f"real MNIST incomplete: {', '.join(missing)} missing in {raw}")
    # Work on a copy: the shared data directory is not ours to write a cache into.
    raw_dir(tmp_path).mkdir(parents=True)
    for path in found.values():
        shutil.copy(path, raw_dir(tmp_path))
    md5s_checked: list[str | None] = []
    real_parse = store.parse

    def spy_parse(*args, **kwargs):
        md5s_checked.append(kwargs["expected_md5"])
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(store, "parse", spy_parse)
    cache = prepare(tmp_path, download=False)[0]
    # Every file has the canonical count, so every file was held to its canonical MD5.
    assert sorted(md5s_checked) == sorted(md5 for _, md5 in CANONICAL.values())

    before = identity(cache)
    decodes = count_decodes(monkeypatch)
    assert prepare(tmp_path, download=False)[0] == cache
    assert decodes == [] and identity(cache) == before

    data = load(tmp_path)
    assert data["train_images"].shape == (60000, 28, 28)
    assert data["test_images"].shape == (10000, 28, 28)
    assert data["train_labels"].shape == (60000,) and data["test_labels"].shape == (10000,)
    for split in ("train", "test"):
        labels = data[f"{split}_labels"]
        assert labels.dtype == torch.int64
        assert torch.equal(labels.unique(), torch.arange(10))
