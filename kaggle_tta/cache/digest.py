"""Content fingerprints of the files a cache entry depends on: checkpoints, the test images
and factory source files.

What is hashed is the content (SHA-256). What is trusted is a memo of that hash under
``<cache>/.digests``, keyed by the file's resolved path and an identity no user tool sets
back: size, mtime, ctime (which every write, ``touch -d`` and unzip included, moves to now),
inode and device. A file rewritten in place with the same size and mtime therefore gets a
new ctime, misses the memo and is hashed again; a copy on another machine is hashed again
and, with the same bytes, gives the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kaggle_tta.cache.files import atomic_write_bytes, sweep_tmp
from kaggle_tta.config.errors import KaggleTTAError, UserPath

_CHUNK = 1 << 22
READ_FIX = "check that it exists and is readable (its permissions), or remove it"


def identity(path: str | Path) -> str:
    """What must not change for a memoized hash of ``path`` to be trusted."""
    with UserPath(path, READ_FIX):
        st = os.stat(path)
    return f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with UserPath(path, READ_FIX), open(path, "rb") as f:  # the user's file: its OS errors are one line
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _memo(memo_dir: Path | None, key_text: str, compute) -> str:
    if memo_dir is None:
        return compute()
    memo = memo_dir / f"{hashlib.sha256(key_text.encode()).hexdigest()[:24]}.sha256"
    try:
        value = memo.read_text(encoding="ascii").strip()
        if len(value) == 64:
            return value
    except (OSError, UnicodeDecodeError):
        pass
    value = compute()
    try:  # a memo that cannot be written (read-only or full disk) only costs a rehash next time
        memo_dir.mkdir(parents=True, exist_ok=True)
        sweep_tmp(memo_dir, older_than=3600.0)
        atomic_write_bytes(memo, value.encode("ascii"))
    except (OSError, KaggleTTAError):  # the digest is right either way
        pass
    return value


def content_digest(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file's content, memoized by its :func:`identity`."""
    return _memo(memo_dir, identity(path), lambda: _sha256(path))


def files_digest(ids: Sequence[str], paths: Sequence[str], memo_dir: Path | None = None, workers: int = 4) -> str:
    """One SHA-256 over a test set: each id with its file's content digest, in order.

    Memoized as a whole by every file's identity (one stat each), so an unchanged test set
    costs a listing; otherwise every file is read once, hashed in ``workers`` threads
    (hashlib releases the GIL). Paths are not hashed: the same images elsewhere give the same
    fingerprint.
    """
    key = "\n".join(["testset", *ids, *(identity(p) for p in paths)])

    def compute() -> str:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            digests = list(pool.map(_sha256, paths, chunksize=64))
        h = hashlib.sha256()
        for i, d in zip(ids, digests):
            h.update(json.dumps(i).encode() + b"\0" + d.encode() + b"\n")
        return h.hexdigest()

    return _memo(memo_dir, key, compute)
