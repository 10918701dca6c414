"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM ask the loop to stop at the next step."""

from __future__ import annotations

import signal
import threading

__all__ = ["StopRequest"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While active, SIGINT and SIGTERM set :attr:`requested` instead of ending the process.

    The loop polls :attr:`requested` between steps, checkpoints and returns. A
    second signal before then raises ``KeyboardInterrupt`` (an impatient user's
    second Ctrl-C still aborts, e.g. during a long compilation). The previous
    handlers are restored on exit. Outside the main thread, where Python cannot
    install handlers, it does nothing.
    """

    def __init__(self):
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # No printing here: a handler can interrupt a print to the same stream.
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
