"""docs/tutorial.md runs as a reader runs it: each python block pasted into the Python REPL, line
by line, in order, in one console (one namespace, like a notebook), the way `python` reads a
paste: a blank line ends a compound statement, and a statement straight after an indented block
without one is a SyntaxError there, though not in a script.

Blocks preceded by `<!-- needs: mnist -->` use the real MNIST (where `helpers.find_real_mnist()`
finds it); they are skipped where it is absent, and every other block still runs; the test of
the MNIST part then skips with the reason, or fails in CI (helpers.require). A failing block is
reported as `docs/tutorial.md:block<i>@line<n>` with the document's line that failed.
"""

from __future__ import annotations

import code
import re
import sys
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


class Console(code.InteractiveConsole):
    """The REPL's reading and running of lines, keeping the errors it would print."""

    def __init__(self, namespace: dict):
        super().__init__(namespace, filename="<stdin>")
        self.errors: list[str] = []

    def showsyntaxerror(self, filename=None, **kwargs) -> None:
        self.errors.append("".join(traceback.format_exception_only(*sys.exc_info()[:2])))

    def showtraceback(self) -> None:
        kind, value, tb = sys.exc_info()
        # Without the console's own frame, as the REPL prints it.
        self.errors.append("".join(traceback.format_exception(kind, value, tb.tb_next)))


@dataclass
class Paste:
    blocks: list[Block]
    namespace: dict = field(default_factory=lambda: {"__name__": "__console__"})
    ran: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    failure: str | None = None  # the error of the block that failed, with its line

    def require_complete(self) -> None:
        if self.failure is not None:
            pytest.fail(
                "docs/tutorial.md did not paste to the end; see test_every_block_pastes_and_runs",
                pytrace=False,
            )


def paste(console: Console, block: Block) -> str | None:
    """Type `block` into the console line by line, then Enter once more where a statement is
    still open (a paste that ends inside a loop); the first error, with its line in the
    document, or None."""
    lines = block.source.splitlines()
    for number, line in enumerate(lines, start=block.line + 1):
        console.push(line)
        if console.errors:
            return f"{block.filename}, at docs/tutorial.md line {number}:\n{console.errors[0]}"
    if console.buffer:
        console.push("")
    if console.errors:
        return f"{block.filename}, at its end:\n{console.errors[0]}"
    if console.buffer:
        console.resetbuffer()
        return f"{block.filename} ends inside an unfinished statement"
    return None


def paste_all(blocks: list[Block]) -> Paste:
    result = Paste(blocks)
    console = Console(result.namespace)
    for block in blocks:
        reason = missing_requirement(block.needs)
        if reason is not None:
            result.skipped[block.index] = reason
            continue
        result.failure = paste(console, block)
        if result.failure is not None:
            break
        result.ran.append(block.index)
    return result


@pytest.fixture(scope="module")
def pasted(tmp_path_factory) -> Paste:
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the document's paths (configs/, ../shared/data) are from the root
        # MNIST_ROOT for the document's blocks: where the tests found the real MNIST (its
        # blocks are skipped where they found none).
        root = find_real_mnist()
        if root is not None:
            mp.setenv("MNIST_ROOT", str(root))
        # A read-only data root caches under $XDG_CACHE_HOME: keep it out of the real ~/.cache.
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        # The 200-step MNIST loop is several times faster on one thread on a busy runner.
        torch.set_num_threads(1)
        try:
            return paste_all(extract_blocks(DOC.read_text()))
        finally:
            torch.set_num_threads(threads)


def test_document_has_all_its_blocks(pasted: Paste) -> None:
    count = len(pasted.blocks)
    assert count == EXPECTED_BLOCKS, (
        f"docs/tutorial.md has {count} python blocks, expected {EXPECTED_BLOCKS}; "
        "update EXPECTED_BLOCKS when blocks are added or removed on purpose"
    )
    marked = sum("mnist" in b.needs for b in pasted.blocks)
    assert marked == EXPECTED_MNIST_BLOCKS, (
        f"docs/tutorial.md marks {marked} blocks `needs: mnist`, expected "
        f"{EXPECTED_MNIST_BLOCKS} (the document says the real-MNIST part is two blocks)"
    )


def test_every_block_pastes_and_runs(pasted: Paste) -> None:
    if pasted.failure is not None:
        pytest.fail(
            f"a block of docs/tutorial.md fails when pasted into the REPL:\n{pasted.failure}",
            pytrace=False,
        )
    assert pasted.ran == [b.index for b in pasted.blocks if b.index not in pasted.skipped]
    # Only blocks that declare a need may be skipped.
    assert all(pasted.blocks[i].needs for i in pasted.skipped)


def test_walkthrough_is_on_the_projects_lenet(pasted: Paste) -> None:
    pasted.require_complete()
    ns = pasted.namespace
    assert type(ns["net"]) is LeNet
    assert len(ns["params"]) == 10
    assert ns["params"][0].shape == (6, 1, 5, 5)
    assert ns["out"].shape == (1, 10)


def test_backward_fills_conv1_bias_gradient(pasted: Paste) -> None:
    pasted.require_complete()
    before, after = pasted.namespace["bias_grad_before"], pasted.namespace["bias_grad_after"]
    assert before is None or not before.any()
    assert after.shape == (6,) and after.abs().sum() > 0


def test_manual_update_lowers_the_loss(pasted: Paste) -> None:
    pasted.require_complete()
    ns = pasted.namespace
    assert ns["loss_after"] < ns["loss_before"]
    assert ns["loss_after_no_grad"] < ns["loss_after"]


def test_real_mnist_part(pasted: Paste) -> None:
    pasted.require_complete()
    if pasted.skipped:
        require(next(iter(pasted.skipped.values())))
    assert pasted.ran == list(range(len(pasted.blocks)))
    ns = pasted.namespace
    assert Path(ns["MNIST_ROOT"]) == find_real_mnist()
    assert type(ns["mnist_net"]) is LeNet
    assert ns["test_accuracy"] > 0.9


# -- the console pastes as the REPL does ---------------------------------------------------


def blocks_of(source: str) -> list[Block]:
    return extract_blocks(f"```python\n{source}```\n")


@pytest.mark.parametrize(
    "source, error",
    [
        # A script runs these; the REPL does not (blocks 3, 9 and 17 once had this shape).
        ("for i in range(2):\n    x = i\nassert x == 1\n", "SyntaxError"),
        ("if True:\n    y = 1\n\n    z = 2\n", "IndentationError"),
        ("x = 1\nassert x == 2, 'wrong'\n", "AssertionError: wrong"),
    ],
)
def test_the_console_reports_what_the_repl_would(source: str, error: str) -> None:
    result = paste_all(blocks_of(source))
    assert result.failure is not None and error in result.failure, result.failure


def test_a_blank_line_after_a_loop_pastes_and_a_block_may_end_in_one() -> None:
    ok = paste_all(
        blocks_of("for i in range(2):\n    x = i\n\nassert x == 1\nfor j in ():\n    pass\n")
    )
    assert ok.failure is None and ok.ran == [0]


def test_a_failure_names_the_documents_line() -> None:
    (block,) = blocks_of("x = 1\ny = x +\n")
    block.line = 40  # as if the fence stood on line 40: the failing line is the document's 42
    result = paste_all([block])
    assert result.failure.startswith("docs/tutorial.md:block0@line40, at docs/tutorial.md line 42")
