"""One process per run directory: a lock file holding the owner's pid."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLock", "TrainingError", "pid_alive"]

LOCK_NAME = "lowbit.lock"
_STALE_UNREADABLE_S = 10.0  # a lock file with no pid this old was left by a writer that died mid-write


class TrainingError(RuntimeError):
    """The run cannot go on: its directory is in use, or too many steps were skipped."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


class RunLock:
    """Context manager holding ``directory/lowbit.lock`` (created with O_CREAT | O_EXCL).

    A lock whose pid is no longer running (a run killed with SIGKILL) is stale and
    taken over. The lock is removed on exit if it still names this process.

    Raises:
      TrainingError: Another live process holds the lock (on enter).
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME

    def __enter__(self) -> RunLock:
        for _ in range(3):  # a takeover can race with another process's; retry then give up
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_pid(self.path)
                if holder is not None and pid_alive(holder):
                    who = "this process" if holder == os.getpid() else f"process {holder}"
                    raise TrainingError(
                        f"{self.path.parent} is in use by {who} (lock file {self.path}); wait for it to finish, "
                        "or use another out_dir"
                    ) from None
                if holder is None and _age(self.path) < _STALE_UNREADABLE_S:
                    time.sleep(0.1)  # its owner is between creating and writing it
                    continue
                self._take_over_stale(holder)
                continue
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return self
        raise TrainingError(f"could not take the lock {self.path}: another process keeps taking it")

    def _take_over_stale(self, holder: int | None) -> None:
        # Rename, not unlink: of several processes taking over the same stale lock,
        # exactly one rename succeeds; a lock moved by mistake (a live one that
        # replaced the stale one meanwhile) is put back.
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_pid(aside) != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)

    def __exit__(self, *exc) -> None:
        if _read_pid(self.path) == os.getpid():
            os.unlink(self.path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return _STALE_UNREADABLE_S
