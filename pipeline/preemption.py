"""Stop requests by signal: the handler only sets a flag; the loop acts at a step boundary.

SIGTERM (what SLURM and torchrun send before killing) and one configurable signal (SIGUSR1 by
default, what a SLURM `--signal` warning sends) request a stop. The training loop polls the
flag, all ranks agree through a collective, rank 0 saves a checkpoint, and every rank exits
with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    def __init__(self, signal_names: tuple[str, ...]):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
