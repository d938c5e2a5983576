"""SIGTERM means "the node is going away": stop at the next optimizer-step boundary and save.

Before training has started there is nothing new to save, so the process ends at once
with the preempted exit code; during training a flag asks the Trainer to save and stop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.received_at: float | None = None
        self.signal_name: str | None = None
        # loading: nothing new to save, exit at once; training: save at the next step
        # boundary; finishing: let the final uploads complete.
        self.phase = "loading"
        self._exit_early: Callable[[], None] | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def install(self, exit_early: Callable[[], None]) -> None:
        """`exit_early` runs when the signal arrives outside the training loop (it must exit)."""
        self._exit_early = exit_early
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self._event.is_set():
            return
        self.received_at = time.monotonic()
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        if self.phase == "loading" and self._exit_early is not None:
            self._exit_early()
