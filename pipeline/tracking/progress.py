"""A progress line on a terminal, or plain lines in a log: the one helper behind the training
progress bar and the download progress.

On a terminal the line is redrawn in place (`\\r`, at most every `interval` seconds unless
forced), cut to the terminal's width so that it never wraps (a wrapped line would be redrawn
only at its end). Elsewhere (a batch job's log, a pipe) nothing is redrawn: the caller prints
whole lines, as few as it sees fit. A reader that went away (`... | head`) ends the output
quietly.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO


class Line:
    def __init__(self, stream: TextIO, interval: float = 0.1):
        self.stream, self.interval = stream, interval
        self.tty = stream.isatty()
        self.drawn = False
        self.last_draw = 0.0

    def draw(self, text: str, force: bool = False) -> None:
        """Redraw the line with `text` (on a terminal; elsewhere nothing)."""
        now = time.monotonic()
        if not self.tty or (not force and now - self.last_draw < self.interval):
            return
        columns = shutil.get_terminal_size().columns
        self._write(f"\r{text[: max(columns - 1, 20)]}\x1b[K")
        self.drawn, self.last_draw = True, now

    def print(self, text: str) -> None:
        """A whole line (where the output is not a terminal, say)."""
        self._write(text + "\n")

    def end(self, keep: bool = False) -> None:
        """Finish a drawn line: erase it, or with `keep` leave it and go to the next line."""
        if self.tty and self.drawn:
            self._write("\n" if keep else "\r\x1b[K")
        self.drawn = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.tty = False  # nobody reads: draw no more
