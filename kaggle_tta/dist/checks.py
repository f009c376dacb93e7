"""Checks every rank makes before any model is built: one cache folder that every rank can
write, and one job (the same pipeline, settings and test set) on every rank."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from kaggle_tta.config.errors import CacheError, ConfigError
from kaggle_tta.dist.group import all_gather, broadcast
from kaggle_tta.dist.ranks import Ranks, every_rank, one_line

SHARED_WAIT = (
    10.0  # seconds a rank looks again for tokens it does not see yet (NFS caches a folder's listing a few seconds)
)
STALE = 3600.0  # seconds: .ranks/<token> folders older than this were left by a killed run


def check_shared(root: Path, r: Ranks) -> None:
    """Refuses, on every rank and before any forward, a cache.dir that some rank cannot
    write (naming the ranks, their hosts and the OS's reason), then one that is not one
    folder for all ranks (machines that share no filesystem): rank 0 could not assemble
    the others' shards. Each rank leaves a token in ``.ranks/<id>``; each looks for all of
    them, re-listing the folder for up to SHARED_WAIT seconds (another node's fresh file
    can stay hidden that long behind NFS's attribute cache). Rank 0 first removes what
    killed runs left in ``.ranks``."""
    token = broadcast(uuid.uuid4().hex if r.main else None)
    host, shared = socket.gethostname(), Path(root) / ".ranks"
    folder = shared / token
    if r.main:
        _sweep(shared)
    why = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(r.rank)).write_text(host, encoding="utf-8")
    except OSError as exc:
        why = one_line(exc)
    try:
        cannot = [(k, h, p, w) for k, h, p, w in all_gather((r.rank, host, str(root), why)) if w is not None]
        if cannot:
            said = "; ".join(f"rank {k} on {h} cannot write {p} ({w})" for k, h, p, w in cannot)
            raise every_rank(
                CacheError(
                    f"cache.dir: {said}; give every rank a cache.dir it can write (on several machines, one folder "
                    "they all share)"
                )
            )
        missing = _look(folder, r.world, SHARED_WAIT)
        unseen = [(k, h, m) for k, h, m in all_gather((r.rank, host, missing)) if m]  # every rank has looked
    finally:
        if r.main:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    if unseen:
        k, h, m = unseen[0]
        raise every_rank(
            CacheError(
                f"cache.dir ({root}): the {r.world} ranks do not see one folder (machines without a shared filesystem: "
                f"rank {k} on {h} "
                f"does not see the token{'s' if len(m) > 1 else ''} of rank(s) {', '.join(map(str, m))} after "
                f"{SHARED_WAIT:g}s); "
                "point cache.dir at a shared disk, or run each machine alone on its share ('kaggle-tta infer PIPELINE "
                "--share K/N', "
                "with an explicit runtime.precision) and join the caches on one with 'kaggle-tta cache merge PIPELINE "
                "OTHER_CACHE_DIR'"
            )
        )


def _look(folder: Path, world: int, wait: float) -> list[int]:
    """The ranks whose token this rank does not see in ``folder``, looking again (listing
    the folder and its parent afresh, which refreshes an NFS client's cached view of them)
    every half second for up to ``wait`` seconds while some are missing."""
    end = time.monotonic() + wait
    while True:
        try:
            os.listdir(folder.parent)
            names = set(os.listdir(folder))
        except OSError:
            names = set()
        missing = [k for k in range(world) if str(k) not in names]
        if not missing or time.monotonic() >= end:
            return missing
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))


def _sweep(shared: Path, age: float = STALE) -> None:
    """Removes the entries of ``.ranks`` older than ``age`` seconds (tokens of runs killed
    before they removed their own); entries gone meanwhile, or not removable, are left."""
    import shutil

    now = time.time()
    try:
        entries = list(os.scandir(shared))
    except OSError:
        return
    for e in entries:
        with contextlib.suppress(OSError):
            if now - e.stat(follow_symlinks=False).st_mtime < age:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)


def check_same_job(job: dict[str, Any], r: Ranks) -> None:
    """Refuses, on every rank, ranks that do not run the same job as rank 0: ``job`` is each
    rank's short description of it (field -> value: the test set, batch size, members),
    compared in order; the first differing rank and field is named, with both values."""
    host = socket.gethostname()
    every = all_gather((r.rank, host, job))
    _, host0, ref = every[0]
    for k, h, theirs in every[1:]:
        for field in [*ref, *(f for f in theirs if f not in ref)]:
            a, b = ref.get(field, "(none)"), theirs.get(field, "(none)")
            if a != b:
                raise every_rank(
                    ConfigError(
                        f"rank {k}/{r.world} on {h} runs another job than rank 0 on {host0}: {field} is {_short(b)} "
                        f"there and {_short(a)} on rank 0; "
                        "run the same pipeline.yaml, the same --set/--overrides and the same test set on every node"
                    )
                )


def _short(value: Any, width: int = 80) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."
