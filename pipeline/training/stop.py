"""Stop requests by signal: a handler only sets a flag; the training loop acts at a step boundary.

SIGTERM (what SLURM and torchrun send before killing) and one configurable signal (SIGUSR1 by
default, what a SLURM `--signal` warning sends) request a stop from the moment the command
starts; Ctrl-C (SIGINT) does once training runs (`catch_interrupt`; before that it interrupts at
once). The training loop polls `requested`, all ranks agree through a collective, rank 0 saves a
checkpoint, and every rank exits: 75 after SIGTERM or the configured signal, 130 after Ctrl-C. A
second Ctrl-C does not wait for the checkpoint: it interrupts at once, and a third is ignored
while the process ends.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    def __init__(self, signal_names: tuple[str, ...] = ("SIGTERM",)):
        self.requested: str | None = None
        self.interrupts = 0
        self._previous: dict[int, object] = {}
        for name in signal_names:
            self.add(name)

    def add(self, name: str) -> None:
        """Also take `name` (e.g. "SIGUSR1") as a stop request."""
        signum = getattr(signal, name)
        if signum not in self._previous:
            self._previous[signum] = signal.signal(signum, self._handle)

    def catch_interrupt(self) -> None:
        """From now on, the first Ctrl-C is a stop request too."""
        self.add("SIGINT")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self.interrupts += 1
            if self.interrupts > 1:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # no third one mid-way out
                raise KeyboardInterrupt(
                    "interrupted again (Ctrl-C): stopped at once, without a checkpoint"
                )
        self.requested = self.requested or name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
