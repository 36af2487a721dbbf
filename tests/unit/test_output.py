"""What a user reads, in this process: a progress bar that fits the terminal. What real runs
print when they start, train, resume and have nothing left to do is in
tests/multiproc/test_run_output.py; W&B named in one word in the header, and not loaded unless
asked for: tests/unit/test_tracking.py."""

from __future__ import annotations

import io
import os

from pipeline.tracking.tracker import Progress


def test_progress_on_a_terminal_fits_its_width(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((60, 20)))
    stream = Terminal()
    progress = Progress(stream, epoch=0, epochs=3, total=938, start=400)
    progress.update(450, 0.1234, 12345.0)
    (line,) = stream.getvalue().split("\r")[1:]
    assert len(line.removesuffix("\x1b[K")) < 60
    assert line.startswith("epoch 1/3 |")
