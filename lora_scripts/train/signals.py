"""Graceful stop on SIGTERM / SIGINT: finish the current step, write a checkpoint, exit 0.

A second SIGINT (Ctrl-C twice) restores the default handler's behaviour and interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Context manager that records the first SIGTERM/SIGINT instead of dying (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
