"""Where the tests find the real MNIST without being told (helpers.find_real_mnist): $MNIST_ROOT
where it is set, and only there; else data/ of the checkout, where the quick start's first run
downloads it; else ../shared/data beside the checkout. Where none holds MNIST/raw, the reason a
test skips (or fails, in CI) with names every place looked in."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import find_real_mnist, real_mnist_missing


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A checkout, its data/ and the ../shared/data beside it (none holding MNIST yet)."""
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    return repo, repo / "data", tmp_path / "work" / "shared" / "data"


def holding_mnist(root: Path) -> Path:
    (root / "MNIST" / "raw").mkdir(parents=True)
    return root


def test_mnist_root_wins_where_it_is_set(places, tmp_path):
    repo, data, shared = places
    holding_mnist(data)
    holding_mnist(shared)
    chosen = holding_mnist(tmp_path / "elsewhere")
    assert find_real_mnist({"MNIST_ROOT": str(chosen)}, repo) == chosen


def test_a_mnist_root_without_mnist_is_not_passed_over(places, tmp_path):
    repo, data, shared = places
    holding_mnist(data)
    holding_mnist(shared)
    empty = tmp_path / "empty"
    assert find_real_mnist({"MNIST_ROOT": str(empty)}, repo) is None
    reason = real_mnist_missing({"MNIST_ROOT": str(empty)}, repo)
    assert reason.startswith(f"real MNIST not found at {empty}/MNIST/raw (MNIST_ROOT)")
    assert str(data / "MNIST" / "raw") in reason and str(shared / "MNIST" / "raw") in reason


def test_without_mnist_root_the_checkouts_data_then_the_shared_data(places):
    repo, data, shared = places
    holding_mnist(shared)
    assert find_real_mnist({}, repo) == shared
    assert find_real_mnist({"MNIST_ROOT": ""}, repo) == shared  # set but empty: not set
    holding_mnist(data)
    assert find_real_mnist({}, repo) == data


def test_nowhere_names_the_three_places(places):
    repo, data, shared = places
    data.mkdir()  # a data/ without MNIST/raw does not count
    assert find_real_mnist({}, repo) is None
    reason = real_mnist_missing({}, repo)
    assert "MNIST_ROOT is not set" in reason and "set MNIST_ROOT to a directory" in reason
    assert str(data / "MNIST" / "raw") in reason and str(shared / "MNIST" / "raw") in reason
    assert "python -m pipeline.train --config configs/cpu.yaml" in reason and "\n" not in reason
