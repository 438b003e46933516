"""An inter-process file lock for first-use work in a shared data dir (tfds prepare, tokenizer
training): several processes of one job, or parallel jobs, may all start with an empty dir."""

from __future__ import annotations

import contextlib
import fcntl
import pathlib
from collections.abc import Iterator


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
