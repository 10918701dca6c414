"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM ask the loop to stop at the next step."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["StopRequest", "deferred"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """While active, SIGINT and SIGTERM set :attr:`requested` instead of ending the process.

    The loop polls :attr:`requested` between steps, checkpoints and returns. A
    second signal before then raises ``KeyboardInterrupt`` (an impatient user's
    second Ctrl-C still aborts, e.g. during a long compilation), except inside
    :meth:`shielded` (a checkpoint write), where it only confirms the stop. The
    previous handlers are restored on exit. Outside the main thread, where
    Python cannot install handlers, it does nothing.
    """

    def __init__(self):
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict[int, object] = {}
        self._shielded = 0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A block no signal interrupts: a signal there requests the stop (or confirms it), never raises.

        For the checkpoint write that a stop needs: a second Ctrl-C during it
        must not abort it half-way (orbax's threads would print tracebacks and
        leave a temporary directory); the run stops right after it instead.
        """
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1

    def _handle(self, signum: int, frame) -> None:
        # No printing here: a handler can interrupt a print to the same stream.
        if self.requested is not None:
            if self._shielded:
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM while the block runs, then delivers each one that arrived.

    For a write that must finish once started (a checkpoint): a Ctrl-C in the
    middle reaches the previous handler (once per signal, however often it was
    sent) only when the block is done, so ``KeyboardInterrupt`` is raised after
    the write, not inside orbax's threads. A default (``SIG_DFL``) SIGTERM
    then ends the process as it would have; an ignored signal stays ignored.
    Outside the main thread it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame) -> None:
        if signum not in pending:
            pending.append(signum)

    # A handler installed outside Python (getsignal gives None) cannot be put back: left alone.
    previous = {sig: signal.signal(sig, hold) for sig in _SIGNALS if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in pending:
            held = previous[signal.Signals(signum)]
            if callable(held):
                held(signum, None)
            elif held == signal.SIG_DFL:
                signal.raise_signal(signum)
