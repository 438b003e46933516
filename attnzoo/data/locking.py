"""Inter-process file locks: ``file_lock`` (waits) for first-use work in a shared data dir (tfds
prepare, tokenizer training), where several processes of one job, or parallel jobs, may all start
with an empty dir; ``hold_lock`` (fails at once, names the holder) for one writer per workdir."""

from __future__ import annotations

import contextlib
import fcntl
import pathlib
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def file_lock(path: str | pathlib.Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created with its folder) for the block.

    Callers re-check whether the work is done after acquiring: the process that waited usually
    finds it done by the one that held the lock.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LockHeld(Exception):
    """``hold_lock`` found ``path`` locked by another process; ``holder`` is what that process
    wrote into the file after locking it (empty if it had not yet)."""

    def __init__(self, path: pathlib.Path, holder: str):
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path = path
        self.holder = holder


def hold_lock(path: str | pathlib.Path, note: str) -> IO[str]:
    """Takes an exclusive ``flock`` on ``path`` without waiting and writes ``note`` into it.

    Returns the open file: the lock lasts until it is closed or the process ends, however it
    ends (the kernel drops a flock on ``kill -9`` too, so a stale lock file never blocks the
    next run). Raises ``LockHeld`` with the holder's note when another process has it.
    """
    path = pathlib.Path(path)
    f = open(path, "a+")  # noqa: SIM115  (returned: the caller closes it to release)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        raise LockHeld(path, holder) from None
    except BaseException:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(note + "\n")
    f.flush()
    return f
