"""docs/tutorial.md runs: its python blocks execute in order, in one namespace, like a notebook.

Blocks preceded by `<!-- needs: mnist -->` use the real MNIST (where `helpers.find_real_mnist()`
finds it); they are skipped where it is absent, and every other block still runs; the test of
the MNIST part then skips with the reason, or fails in CI (helpers.require). A failing block is
reported with its file name `docs/tutorial.md:block<i>@line<n>`, and its line numbers in the
traceback are those of the document.
"""

from __future__ import annotations

import linecache
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pipeline.model import LeNet

from helpers import REPO, find_real_mnist, real_mnist_missing, require

DOC = REPO / "docs" / "tutorial.md"
# The number of python blocks in the document: deleting or merging blocks must be noticed.
EXPECTED_BLOCKS = 20
# "The next two blocks need those files": the blocks marked `needs: mnist`.
EXPECTED_MNIST_BLOCKS = 2
_NEEDS = re.compile(r"<!--\s*needs:\s*([\w, ]+?)\s*-->")


@dataclass
class Block:
    index: int
    line: int  # line of the opening ```python fence, 1-based
    source: str
    needs: set[str]

    @property
    def filename(self) -> str:
        return f"docs/tutorial.md:block{self.index}@line{self.line}"


@dataclass
class DocRun:
    blocks: list[Block]
    namespace: dict = field(default_factory=dict)
    ran: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    failure: str | None = None  # the traceback of the block that failed

    def require_complete(self) -> None:
        if self.failure is not None:
            pytest.fail(
                "docs/tutorial.md did not run to the end; see test_every_block_runs",
                pytrace=False,
            )


def extract_blocks(text: str) -> list[Block]:
    """The ```python blocks of `text`, in order, each with the needs marked just before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        previous = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        match = _NEEDS.fullmatch(previous)
        needs = {n.strip() for n in match.group(1).split(",")} if match else set()
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        assert i < len(lines), f"docs/tutorial.md:{start + 1}: python block is never closed"
        blocks.append(Block(len(blocks), start + 1, "\n".join(lines[start + 1 : i]) + "\n", needs))
        i += 1
    return blocks


def missing_requirement(needs: set[str]) -> str | None:
    """Why a block with these needs cannot run here, or None when it can."""
    for need in sorted(needs):
        if need != "mnist":
            raise AssertionError(f"docs/tutorial.md marks a block with unknown need {need!r}")
        if find_real_mnist() is None:
            return real_mnist_missing()
    return None


def set_mnist_root(mp: pytest.MonkeyPatch) -> None:
    """MNIST_ROOT for the document's blocks: where the tests found the real MNIST (its blocks
    are skipped where they found none)."""
    root = find_real_mnist()
    if root is not None:
        mp.setenv("MNIST_ROOT", str(root))


def execute(block: Block, namespace: dict) -> None:
    # Pad with blank lines so that traceback line numbers are the document's own, and register
    # the text with linecache so that tracebacks show the failing line.
    source = "\n" * block.line + block.source
    linecache.cache[block.filename] = (len(source), None, source.splitlines(True), block.filename)
    exec(compile(source, block.filename, "exec"), namespace)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory) -> DocRun:
    run = DocRun(extract_blocks(DOC.read_text()))
    run.namespace["__name__"] = "tutorial"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the document's paths (configs/, ../shared/data) are from the root
        set_mnist_root(mp)
        # A read-only data root caches under $XDG_CACHE_HOME: keep it out of the real ~/.cache.
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        # The 200-step MNIST loop is several times faster on one thread on a busy runner.
        torch.set_num_threads(1)
        try:
            for block in run.blocks:
                reason = missing_requirement(block.needs)
                if reason is not None:
                    run.skipped[block.index] = reason
                    continue
                try:
                    execute(block, run.namespace)
                except Exception:
                    run.failure = traceback.format_exc()
                    break
                run.ran.append(block.index)
        finally:
            torch.set_num_threads(threads)
    return run


def test_document_has_all_its_blocks(doc_run: DocRun) -> None:
    count = len(doc_run.blocks)
    assert count == EXPECTED_BLOCKS, (
        f"docs/tutorial.md has {count} python blocks, expected {EXPECTED_BLOCKS}; "
        "update EXPECTED_BLOCKS when blocks are added or removed on purpose"
    )
    marked = sum("mnist" in b.needs for b in doc_run.blocks)
    assert marked == EXPECTED_MNIST_BLOCKS, (
        f"docs/tutorial.md marks {marked} blocks `needs: mnist`, expected "
        f"{EXPECTED_MNIST_BLOCKS} (the document says the real-MNIST part is two blocks)"
    )


def test_every_block_runs(doc_run: DocRun) -> None:
    if doc_run.failure is not None:
        pytest.fail(f"a block of docs/tutorial.md failed:\n{doc_run.failure}", pytrace=False)
    expected = [b.index for b in doc_run.blocks if b.index not in doc_run.skipped]
    assert doc_run.ran == expected
    # Only blocks that declare a need may be skipped.
    assert all(doc_run.blocks[i].needs for i in doc_run.skipped)


def test_walkthrough_is_on_the_projects_lenet(doc_run: DocRun) -> None:
    doc_run.require_complete()
    ns = doc_run.namespace
    assert type(ns["net"]) is LeNet
    assert len(ns["params"]) == 10
    assert ns["params"][0].shape == (6, 1, 5, 5)
    assert ns["out"].shape == (1, 10)


def test_backward_fills_conv1_bias_gradient(doc_run: DocRun) -> None:
    doc_run.require_complete()
    before, after = doc_run.namespace["bias_grad_before"], doc_run.namespace["bias_grad_after"]
    assert before is None or not before.any()
    assert after.shape == (6,) and after.abs().sum() > 0


def test_manual_update_lowers_the_loss(doc_run: DocRun) -> None:
    doc_run.require_complete()
    ns = doc_run.namespace
    assert ns["loss_after"] < ns["loss_before"]
    assert ns["loss_after_no_grad"] < ns["loss_after"]


def test_real_mnist_part(doc_run: DocRun) -> None:
    doc_run.require_complete()
    if doc_run.skipped:
        require(next(iter(doc_run.skipped.values())))
    ns = doc_run.namespace
    assert Path(ns["MNIST_ROOT"]) == find_real_mnist()
    assert type(ns["mnist_net"]) is LeNet
    assert ns["test_accuracy"] > 0.9
