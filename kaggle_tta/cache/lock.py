"""Locks on cache entries, so that several processes on one cache are safe.

A run holds an exclusive ``flock`` on every entry it may write (``<entry>/.lock``) for as
long as it writes, taken in one sorted order so that two runs never wait for each other in
a cycle. A second run on the same entries waits, then finds what the first completed and
computes only what is still missing; entries end bit-identical to a single run's. The
kernel releases a lock when its process dies, so a killed run never leaves one behind.
Locks need a local filesystem (or NFS with lock support); readers (blends) take none: they
read only views the manifest marks complete, which are renamed into place whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kaggle_tta.cache.files import writing


@contextlib.contextmanager
def locked(folders: Iterable[Path], on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Holds an exclusive lock on each folder (created if missing) inside the block."""
    fds: list[int] = []
    try:
        for folder in sorted({Path(f) for f in folders}):
            with writing(folder):
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
