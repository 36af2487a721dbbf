"""docs/tutorial.md pastes into the Python REPL: each python block, line by line, in order, in one
console, the way `python` reads a paste (a blank line ends a compound statement, and a statement
straight after an indented block without one is a SyntaxError there, though not in a script).

test_tutorial.py runs the same blocks as whole scripts; this file reuses its block extraction
and its notion of a block's needs (`<!-- needs: mnist -->`: skipped where the real MNIST is
absent).
"""

from __future__ import annotations

import code
import sys
import traceback
from dataclasses import dataclass, field

import pytest
import torch
from test_tutorial import DOC, Block, extract_blocks, missing_requirement, set_mnist_root

from helpers import REPO, require


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
    ran: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    failure: str | None = None


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
    result, console = Paste(), Console({"__name__": "__console__"})
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
        # As in test_tutorial.py: from the root, the real MNIST, a cache outside ~/.cache.
        mp.chdir(REPO)
        set_mnist_root(mp)
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        torch.set_num_threads(1)
        try:
            return paste_all(extract_blocks(DOC.read_text()))
        finally:
            torch.set_num_threads(threads)


def test_every_block_pastes_into_the_repl(pasted: Paste) -> None:
    if pasted.failure is not None:
        pytest.fail(
            f"a block of docs/tutorial.md fails when pasted into the REPL:\n{pasted.failure}",
            pytrace=False,
        )
    assert pasted.ran and all(i not in pasted.skipped for i in pasted.ran)


def test_mnist_blocks_paste_into_the_repl(pasted: Paste) -> None:
    if pasted.failure is not None:
        pytest.fail("docs/tutorial.md did not paste to the end; see the test above", pytrace=False)
    if pasted.skipped:
        require(next(iter(pasted.skipped.values())))
    assert len(pasted.ran) == len(extract_blocks(DOC.read_text()))


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
