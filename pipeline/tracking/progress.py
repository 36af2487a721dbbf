"""A progress line on a terminal, or plain lines in a log: the helper behind the training
progress bar, and the one owner of the rule that anything else printed starts on a line of
its own (`end_line`: called by the logging handler and the Ctrl-C line of `pipeline.cli`,
and by `Line.print`).

On a terminal the line is redrawn in place (`\\r`, at most every `interval` seconds unless
forced), never wider than the terminal (`fit`: the least important fields are left out rather
than wrapped, since a wrapped line would be redrawn only at its end). Elsewhere (a batch job's
log, a pipe) nothing is redrawn: the caller prints whole lines, as few as it sees fit. A reader
that went away (`... | head`) ends the output quietly.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

BAR = "\0bar"  # in `fit`'s fields: a bar of the fraction done, shown after the first field
BAR_WIDTH = (8, 20)  # its narrowest and widest inside, in characters

_drawn: Line | None = None  # the line drawn in place now, if any


def width() -> int:
    """The terminal's width in columns (80 where it is unknown)."""
    return shutil.get_terminal_size().columns  # its fallback: 80


def fit(fields: list[str], columns: int, fraction: float = 0.0) -> str:
    """`fields`, the most important first, separated by spaces in at most `columns` characters:
    the least important left out until the rest fits (the first alone is cut). A field `BAR` is
    a bar of `fraction` done, shown after the first field, as wide as the room left allows."""
    for n in range(len(fields), 0, -1):
        kept = fields[:n]
        text = " ".join(f for f in kept if f != BAR)
        if BAR in kept:
            inner = min(BAR_WIDTH[1], columns - len(text) - 3)  # 3: its two ends and a space
            if inner < BAR_WIDTH[0]:
                continue
            done = int(inner * fraction)
            bar = f"|{'#' * done}{'.' * (inner - done)}|"
            text = " ".join([kept[0], bar, *(f for f in kept[1:] if f != BAR)])
        if len(text) <= columns:
            return text
    return fields[0][:columns]


def end_line() -> None:
    """End the line drawn in place, if any, so that what is printed next (a log message, the
    Ctrl-C line) starts on a line of its own: the line stays as last drawn, and the next draw
    goes below the message."""
    if _drawn is not None:
        _drawn.end(keep=True)


class Line:
    def __init__(self, stream: TextIO, interval: float = 0.1):
        self.stream, self.interval = stream, interval
        self.tty = stream.isatty()
        self.drawn = False
        self.last_draw = 0.0

    def draw(self, fields: list[str], fraction: float = 0.0, force: bool = False) -> None:
        """Redraw the line with `fields` (see `fit`) on a terminal; elsewhere nothing."""
        global _drawn
        now = time.monotonic()
        if not self.tty or (not force and now - self.last_draw < self.interval):
            return
        # The last column stays free: a line that fills it wraps on some terminals.
        self._write(f"\r{fit(fields, width() - 1, fraction)}\x1b[K")
        self.drawn, self.last_draw, _drawn = True, now, self

    def print(self, text: str) -> None:
        """A whole line (where the output is not a terminal, say), below any drawn line."""
        end_line()
        self._write(text + "\n")

    def end(self, keep: bool = False) -> None:
        """Finish a drawn line: erase it, or with `keep` leave it and go to the next line."""
        global _drawn
        if self.tty and self.drawn:
            self._write("\n" if keep else "\r\x1b[K")
        self.drawn = False
        if _drawn is self:
            _drawn = None

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.tty = False  # nobody reads: draw no more
