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
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kaggle_tta.cache.files import writing
from kaggle_tta.config.errors import KaggleTTAError


@contextlib.contextmanager
def locked(folders: Iterable[Path], on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Holds an exclusive lock on each folder (created if missing) inside the block; a lock
    file removed meanwhile (cache prune, a shard's release) is not held: the new one is."""
    fds: list[int] = []
    try:
        for folder in sorted({Path(f) for f in folders}):
            fd = take_lock(folder, wait=True, create=True, on_wait=on_wait)
            assert fd is not None
            fds.append(fd)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock


def take_lock(folder: Path, wait: bool, create: bool, on_wait: Callable[[Path], None] | None = None) -> int | None:
    """An fd holding ``folder``'s lock, the lock file still at its path; None where the
    folder is gone (``create`` False: it is not made again) or the lock is held (``wait``
    False)."""
    while True:
        if create:
            with writing(folder):
                folder.mkdir(parents=True, exist_ok=True)
        try:
            with writing(folder):
                fd = os.open(
                    folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644
                )  # a shard copied here (cache merge) has none
        except KaggleTTAError:
            if create:
                raise
            return None  # removed: nothing to lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return None
            if on_wait is not None:
                on_wait(folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            held, now = os.fstat(fd), os.stat(folder / ".lock")
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the shard was removed while this process waited: take the new lock
        if not create:
            return None


def remove_held(folder: Path) -> None:
    """Removes a folder (an entry, a shard) whose lock this process holds: its files, the lock
    last, then the folder, which another process may have made anew. A process that waited
    on the removed lock file finds it gone and takes the new one (:func:`take_lock`)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name != ".lock":
                p = folder / name
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        with contextlib.suppress(FileNotFoundError):
            (folder / ".lock").unlink()
        folder.rmdir()
