"""The fixtures of every tier (tests/unit, tests/multiproc, tests/integration; docs/tests.md):
the commands' logging, a tiny IDX dataset, the real MNIST, and the unit tier's rule of torch's
conv ops. What the tests share besides fixtures is in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli
from pipeline.speed import kernels

from helpers import REPO, TESTS, require_real_mnist, write_tiny_mnist

UNIT = TESTS / "unit"
TIERS = (UNIT, TESTS / "multiproc", TESTS / "integration")


def pytest_collection_modifyitems(config, items):
    """Every test is in a tier: CI runs the tiers' folders, and a test file beside them would
    never run there."""
    outside = sorted({str(i.path.relative_to(REPO)) for i in items if not _in_a_tier(i.path)})
    if outside:
        raise pytest.UsageError(
            f"{', '.join(outside)}: in no tier; move each into tests/unit, tests/multiproc or "
            "tests/integration (docs/tests.md says which)"
        )


def _in_a_tier(path: Path) -> bool:
    return any(path.is_relative_to(tier) for tier in TIERS)


@pytest.fixture(autouse=True)
def project_logging():
    """The logging set-up of the commands (`pipeline.cli.run`): what a test reads on stdout and
    stderr is what a user sees."""
    cli.setup_logging()


@pytest.fixture(autouse=True)
def unit_tests_use_torchs_conv_ops(request, monkeypatch):
    """The unit tier never builds the fused conv kernels: that compiles C++, and the tier needs
    no compiler (tests/integration/test_kernels.py tests them). A unit test whose model would
    load them (`train.fused_conv` true or auto) fails, saying so."""
    if not request.path.is_relative_to(UNIT):
        return

    def load(variant=None):
        raise AssertionError(
            "a unit test would build the fused conv kernels (C++): give its run "
            "train.fused_conv=false, or put the test in tests/integration"
        )

    monkeypatch.setattr(kernels, "load", load)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The full MNIST ($MNIST_ROOT, else data/ of the checkout, else ../shared/data); tests
    using it skip where it is not found (and fail in CI)."""
    return require_real_mnist()


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny-mnist"))
