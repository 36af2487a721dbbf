"""The fixtures of every tier (tests/unit, tests/multiproc, tests/integration; docs/tests.md):
the commands' logging, a tiny IDX dataset, the real MNIST, and the unit tier's rule of torch's
conv ops; the cleanup that ends every process a test started when the test ends, and every
process the suite started when it ends or is interrupted (Ctrl-C); and a folder of tests spread
over the cores, a file to a worker (pytest_cmdline_main). What the tests share besides fixtures
is in helpers.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.speed import kernels

from helpers import OWNER, REPO, TESTS, end_processes, require_real_mnist, write_tiny_mnist

UNIT = TESTS / "unit"
TIERS = (UNIT, TESTS / "multiproc", TESTS / "integration")


class ProcessCleanup:
    """Every process a test starts is ended when the test ends; every process the suite started,
    when the suite ends or is interrupted (Ctrl-C). A process is known by its environment's
    OWNER (helpers.py), inherited whatever its session or parent: the suite's id, or
    <suite>:<test> for what a test (or a fixture of its own) starts. subprocess.run, interrupted
    or timed out, kills only its child: not a torchrun agent's ranks, in sessions of their own.
    Spread over workers, each worker is a suite of its own; a terminal's Ctrl-C reaches them
    all (the foreground process group), and the workers are among what their suite started."""

    suite = uuid.uuid4().hex

    def of_the_suite(self, owner: str) -> bool:
        return owner.partition(":")[0] == self.suite

    def pytest_sessionstart(self, session):
        os.environ[OWNER] = self.suite

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session, exitstatus):
        """After the fixtures' teardown (the Slurm cluster's down.sh among them), which pytest
        runs on Ctrl-C too."""
        try:
            return (yield)
        finally:
            end_processes(OWNER, self.of_the_suite)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        test = os.environ[OWNER] = f"{self.suite}:{uuid.uuid4().hex}"
        try:
            return (yield)
        finally:
            os.environ[OWNER] = self.suite
            end_processes(OWNER, test.__eq__)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        """A fixture shared beyond one test (the Slurm cluster, a module's training run) starts
        its processes as the suite's: they outlive the test that first asked for it."""
        if fixturedef.scope == "function":
            return (yield)
        test, os.environ[OWNER] = os.environ[OWNER], self.suite
        try:
            return (yield)
        finally:
            os.environ[OWNER] = test


# Workers a suite spread over the cores has at most: more only add processes holding torch, as
# the suite's longest files (the Slurm jobs, the elastic agents) then bound its time.
MAX_WORKERS = 4


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which starts the workers it is told
def pytest_cmdline_main(config):
    """A folder of tests (the whole suite, a tier) is spread over this machine's cores, a file
    to a worker process (pytest-xdist: `spread_over_the_cores`); a file or a test named on the
    command line runs in this process, as does every run given -n, -s, --pdb or --collect-only.
    With -n N and no --dist, the files are the unit too: a file's fixtures are made once."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return  # no pytest-xdist; or a worker, which runs what it is given
    if config.option.numprocesses is not None:
        if config.option.dist == "no":
            config.option.dist = "loadfile"
    elif spread_over_the_cores(config):
        config.option.numprocesses = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        config.option.dist = "loadfile"


def spread_over_the_cores(config) -> bool:
    """Whether this run is one to spread (see pytest_cmdline_main): folders only, on a machine
    of 2 or more cores, with output captured and nothing to step through."""
    o = config.option
    if o.dist != "no" or o.collectonly or o.usepdb or o.trace or o.capture == "no":
        return False
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        return False
    here = config.invocation_params.dir
    return all("::" not in arg and (here / arg).is_dir() for arg in config.args)


def pytest_sessionstart(session):
    """Spread over the cores, the output still names the file of each result as pytest does
    in one process (pytest-xdist leaves the names out): a new line where the file changes."""
    plugins = session.config.pluginmanager
    if plugins.hasplugin("dsession") and plugins.hasplugin("terminalreporter"):
        plugins.getplugin("terminalreporter").showfspath = None  # pytest's default: not with -q


def pytest_report_header(config):
    """Said up front, before the first file runs (docs/tests.md has the measured times)."""
    return [
        "the whole suite takes about 10 minutes on 2 cores (tests/unit 20 s, tests/multiproc "
        "4 min, tests/integration 5 min); the quick tier alone: python -m pytest tests/unit"
    ]


def pytest_configure(config):
    # A plugin, not this conftest's own hooks: those are not called for session-scoped fixtures.
    config.pluginmanager.register(ProcessCleanup(), "process-cleanup")
    # One thread, as in every process a test starts (helpers.child_env): a command called in
    # this process trains as its own process would, and two such runs never share the cores.
    torch.set_num_threads(1)


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
