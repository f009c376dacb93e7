"""Rows of one entry computed by several ranks: shard entries and their assembly.

Under torchrun each rank computes a contiguous share of the test set, rows ``lo:hi``, into
a shard entry of its own (:meth:`CacheEntry.shard`)::

    <cache>/<member>/<fingerprint>/shards/<lo>-<hi>/    an entry of hi - lo rows: manifest,
                                                         views, image sizes, ids, its own lock

A shard is an ordinary entry (preallocated partials, rows committed with its manifest, a
CRC-32 per view, resumed after a kill), so nothing here is new about writing. When every
rank is done, :func:`assemble` copies the complete shard views, in row order, into the
entry's own files through the same writers a single process uses (so the files are
bit-identical to one process's), view by view: once a view is committed in the entry, the
shards' copies of it are deleted, so the disk holds the shards plus one view, never the
shards plus the whole entry. A shard is removed once it holds nothing the entry lacks.

A shard's lock is removed with it. So a shard is locked through :func:`shard_lock`, which
checks, once it holds a lock, that the lock file is still the one at that path (a process
that waited on the lock of a shard removed meanwhile takes the new one).

A row is a row whoever computed it: shards of an earlier split (another world size, an
elastic group that changed) are used wherever they cover rows, and :func:`covered` tells a
rank which of its views need no computing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kaggle_tta.cache.coverage import Held, held_by, more_rows, record_held, whole
from kaggle_tta.cache.entry import HELD, SIZES, CacheEntry, DamagedView, held_name
from kaggle_tta.cache.files import RaggedWriter
from kaggle_tta.cache.lock import remove_held, take_lock
from kaggle_tta.config.errors import CacheError

_NAME = re.compile(r"^(\d+)-(\d+)$")
BLOCK = 4096  # rows copied at a time: memory bounded whatever the shard


def list_shards(entry: CacheEntry) -> list[tuple[int, int, CacheEntry]]:
    """Every readable shard of ``entry``: (lo, hi, shard entry), by lo."""
    folder = entry.dir / "shards"
    out: list[tuple[int, int, CacheEntry]] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # none, or removed meanwhile
        return out
    for name in names:
        m = _NAME.match(name)
        if not m or not (folder / name / "manifest.json").is_file():
            continue
        lo, hi = int(m.group(1)), int(m.group(2))
        try:
            out.append((lo, hi, entry.shard(lo, hi)))
        except Exception:  # noqa: BLE001 - a damaged shard manifest (or one removed meanwhile): that shard is not used
            continue
    return out


# ---- locks on shards, which are removed -----------------------------------------------------


@contextlib.contextmanager
def shard_lock(folders: Iterable[Path], on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Holds the lock of each shard folder (created if missing), as cache.lock.locked does
    for entries, in one sorted order; a lock file removed with its shard meanwhile is not
    held (see the module's docstring)."""
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


def _cover(
    shards: list[tuple[int, int, CacheEntry]],
    view: str,
    lo: int,
    hi: int,
    fits: Callable[[CacheEntry, str], bool] | None = None,
) -> list[tuple[int, int, CacheEntry]] | None:
    """Pieces (a, b, shard) of complete shard views that cover rows ``lo:hi`` in order, each
    piece the farthest-reaching shard from where the last ended; None where a row is missing.
    ``fits``: which shards' copies may serve (adaptive views: the rows of which gate)."""
    done = [(a, b, s) for a, b, s in shards if s.is_complete(view) and (fits is None or fits(s, view))]
    pieces, pos = [], lo
    while pos < hi:
        best = max((x for x in done if x[0] <= pos < x[1]), key=lambda x: x[1], default=None)
        if best is None:
            return None
        end = min(hi, best[1])
        pieces.append((pos, end, best[2]))
        pos = end
    return pieces


def covered(
    entry: CacheEntry,
    view: str,
    lo: int,
    hi: int,
    shards: list | None = None,
    fits: Callable[[CacheEntry, str], bool] | None = None,
) -> bool:
    """Whether complete shard views (those ``fits`` accepts) already hold every row of
    ``lo:hi`` of ``view``."""
    return _cover(list_shards(entry) if shards is None else shards, view, lo, hi, fits) is not None


def read_rows(entry: CacheEntry, view: str, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of ``view``: from the entry where it is complete, else from the
    complete shard copies that cover them (an adaptive share reading a first view that
    shards of another split hold)."""
    if entry.is_complete(view) and held_by(entry, view) is None:
        return entry.read(view)[lo:hi]
    pieces = _cover(
        list_shards(entry), view, lo, hi, lambda s, v: held_by(s, v) is None
    )  # every row: never a gated copy
    if pieces is None:
        raise CacheError(
            f"{entry.dir}: view '{view}' rows {lo}-{hi} are neither in the entry nor in its shards; run again"
        )
    return np.concatenate([s.read(view)[a - s.manifest["shard"][0] : b - s.manifest["shard"][0]] for a, b, s in pieces])


@dataclass
class Assembled:
    """What :func:`assemble` did to one entry."""

    views: list[str] = field(default_factory=list)  # views (and SIZES) completed in the entry
    damaged: list[tuple[int, int, str, str]] = field(
        default_factory=list
    )  # (lo, hi, view, why): shard views found damaged, not used


def assemble(
    entry: CacheEntry, views: list[str], n: int, ids: list[str], sizes: bool = False, source: str | None = None
) -> Assembled:
    """Completes each of ``views`` (and, with ``sizes``, the image sizes) that the entry
    lacks and its shards cover, in the entry's own files. Call it holding the entry's lock.

    View by view: once a view is committed in the entry, every shard's copy of it is deleted
    (under that shard's lock; one a run is still writing is left for later), so the disk
    needs room for one view beyond the shards. A shard view that reads back damaged (its
    CRC-32, non-finite values) is marked so in its shard and not used: the entry's view stays
    missing, so that its rows are computed again (``Assembled.damaged`` says which).
    ``source``: the pipeline file, recorded as a user of the entry (cache prune)."""
    out = Assembled()
    shards = list_shards(entry)
    for view in [*views, *([SIZES] if sizes else [])] if shards else []:
        pieces, held = _pieces(shards, view, n)
        if pieces is None or (whole(entry, view) and not more_rows(held_by(entry, view), held)):
            continue
        if entry.view_state(view) and not whole(entry, view):
            # a partial (or a gated view whose mask is not whole): assembled into a fresh file,
            # and the manifest on disk says so first, so that a kill meanwhile resumes nothing
            entry.manifest["views"].pop(view, None)
            entry.manifest["views"].pop(held_name(view), None)
            entry.save()
        replaced, forgotten = _forget_gated(entry, view)
        if held is not None:
            replaced = []  # the row mask is assembled anew in its place
        entry.write_ids(ids)
        if not _assemble_view(entry, view, n, pieces, held, forgotten, out):
            continue
        out.views.append(view)
        for name in replaced:  # the gated view's row mask: no longer named by the manifest
            with contextlib.suppress(FileNotFoundError):
                (entry.dir / name).unlink()
        release_copies(entry, shards, {view})
    if shards:
        release_copies(entry, list_shards(entry), None)
    if entry.mark_used(source) and entry.manifest_path.is_file():
        entry.save()
    return out


def _assemble_view(
    entry: CacheEntry,
    view: str,
    n: int,
    pieces: list,
    held: Held | None,
    forgotten: dict[str, dict],
    out: Assembled,
) -> bool:
    """One view (and, gated, its row mask) written from its shard pieces and committed; False
    where a piece reads back damaged (then the view is left as it was, and ``out`` says so)."""
    try:
        if pieces[0][2].view_state(view).get("kind") == "ragged":
            _ragged(entry, view, n, pieces)
        else:
            _dense(entry, view, n, pieces)
            if held is not None:  # a gated view: its rows' mask too, and the gate they were chosen by
                _dense(entry, held_name(view), n, pieces)
                record_held(entry, view, held)
        entry.commit()
    except DamagedView as exc:  # marked in its shard by the read: never assembled
        lo, hi = exc.entry.manifest.get("shard", [0, 0])
        out.damaged.append((int(lo), int(hi), view, exc.reason))
        print(
            f"kaggle-tta: {exc.entry.path(view)}: damaged ({exc.reason}); not assembled, its rows are computed again",
            file=sys.stderr,
            flush=True,
        )
        entry.close()
        entry.manifest["views"].pop(held_name(view), None)
        entry.manifest["views"].update(forgotten)  # the gated view as it was: its files are still there
        return False
    finally:
        entry.close()
        entry.save()
    return True


def _pieces(shards: list[tuple[int, int, CacheEntry]], view: str, n: int) -> tuple[list | None, Held | None]:
    """Shard pieces covering every row of ``view``, and the gate their rows were chosen by
    (None: plain rows). Plain pieces first; else pieces that all hold the rows of one gate
    (adaptive views: with their row masks), never a mix."""
    plain = _cover(shards, view, 0, n, lambda s, v: held_by(s, v) is None)
    if plain is not None:
        return plain, None
    gates = []
    for _, _, s in shards:
        h = held_by(s, view)
        if h is not None and h not in gates:
            gates.append(h)
    for h in gates:

        def of_gate(s: CacheEntry, v: str, h: Held = h) -> bool:
            return held_by(s, v) == h and s.is_complete(held_name(v))

        pieces = _cover(shards, view, 0, n, of_gate)
        if pieces is not None:
            return pieces, h
    return None, None


def _holds_as(entry: CacheEntry, view: str, shards: list[tuple[int, int, CacheEntry]]) -> bool:
    """Whether the entry's complete ``view`` holds every row its shards' copies hold: it is
    plain, or gated at least as loosely as they are (kaggle_tta.ops.gate). A gated view (its
    rows only where a gate sent them on) does not stand for the plain view a share computed."""
    held = held_by(entry, view)
    if held is None:
        return True  # a plain view holds every row
    if not entry.is_complete(held_name(view)):
        return False  # its mask damaged or missing: it holds no row that can be read
    for _, _, s in shards:
        if view in s.manifest["views"]:
            theirs = held_by(s, view)
            if theirs is None or (theirs != held and not more_rows(theirs, held)):
                return False
    return True


def _forget_gated(entry: CacheEntry, view: str) -> tuple[list[str], dict[str, dict]]:
    """Drops a gated ``view`` (and its held-row companion) from the entry's manifest, so
    that the shards' plain rows are assembled in its place. Returns the companion's files,
    deleted once the plain view is committed, and the states dropped (put back where the
    assembly finds a shard damaged: the gated view is then kept as it was)."""
    if held_by(entry, view) is None:
        return [], {}
    states = entry.manifest["views"]
    forgotten = {view: states.pop(view)}
    companion = states.pop(held_name(view), None)
    if companion is None:
        return [], forgotten
    forgotten[held_name(view)] = companion
    return [f"{held_name(view)}.npy", f"{held_name(view)}.npy.partial"], forgotten


def _dense(entry: CacheEntry, view: str, n: int, pieces: list[tuple[int, int, CacheEntry]]) -> None:
    st = pieces[0][2].view_state(view)
    shape, dtype = (n, *st["shape"][1:]), st["dtype"]
    for _, _, s in pieces:
        other = s.view_state(view)
        if list(other["shape"][1:]) != list(shape[1:]) or other["dtype"] != dtype:
            from kaggle_tta.config.errors import CacheError

            raise CacheError(
                f"{s.dir}: view '{view}' is {other['shape'][1:]} {other['dtype']} where {pieces[0][2].dir} is "
                f"{list(shape[1:])} {dtype}; delete {entry.dir / 'shards'} and run again"
            )
    mm, _ = entry.open_for_write(view, shape, dtype)
    seconds = nonfinite = 0.0
    for a, b, s in pieces:
        lo = s.manifest["shard"][0]
        rows = int(s.view_state(view)["rows"])
        # read whole from its first row, in blocks, so that its CRC-32 is checked
        for k in range(0, rows, BLOCK):
            block = s.rows(view, k, min(rows, k + BLOCK))
            x, y = max(a, lo + k), min(b, lo + k + len(block))
            if x < y:
                mm[x:y] = block[x - lo - k : y - lo - k]
        seconds += float(s.view_state(view).get("seconds", 0.0)) * (b - a) / max(1, rows)
        nonfinite += int(s.view_state(view).get("nonfinite_recomputed", 0))
    entry.record(view, n, seconds, int(nonfinite))


def _ragged(entry: CacheEntry, view: str, n: int, pieces: list[tuple[int, int, CacheEntry]]) -> None:
    writer, start = entry.open_ragged(view, n)
    if start:  # an earlier single-process partial: every image is written again, from the first
        writer = entry.rewind(view, 0)
    assert isinstance(writer, RaggedWriter)
    seconds = nonfinite = 0.0
    for a, b, s in pieces:
        lo = s.manifest["shard"][0]
        rows, offsets = s.read_ragged(view)  # verified: CRC-32, finite
        writer.write(a, [rows[offsets[i - lo] : offsets[i - lo + 1]] for i in range(a, b)])
        seconds += float(s.view_state(view).get("seconds", 0.0)) * (b - a) / max(1, len(offsets) - 1)
        nonfinite += int(s.view_state(view).get("nonfinite_recomputed", 0))
    entry.record(view, n, seconds, int(nonfinite))


SHARD_FILES = (
    "{v}.npy",
    "{v}.npy.partial",
    "{v}.boxes.npy",
    "{v}.offsets.npy",
    "{v}.boxes.partial",
    "{v}.offsets.npy.partial",
)


def release_copies(entry: CacheEntry, shards: list[tuple[int, int, CacheEntry]], views: set[str] | None) -> None:
    """Deletes the shards' copies of ``views`` (None: of every view) that the entry holds
    complete, and removes each shard left holding nothing. Only under the shard's own lock,
    taken without waiting: a shard a run is writing is left for a later assembly. A view the
    entry lacks is never deleted, partial or not (a killed rank resumes from it)."""
    for _, _, s in shards:
        fd = take_lock(s.dir, wait=False, create=False)
        if fd is None:
            continue
        try:
            try:
                s.reload()
            except CacheError:
                continue  # a damaged shard manifest: left for the user (list_shards skips it)
            done = [v for v in s.manifest["views"] if _released(entry, s, v, views)]
            if done:
                for v in done:  # the manifest first: it never names a file that is gone
                    del s.manifest["views"][v]
                s.save()
                for v in done:
                    for name in SHARD_FILES:
                        with contextlib.suppress(FileNotFoundError):
                            (s.dir / name.format(v=v)).unlink()
            if not s.manifest["views"]:
                remove_held(s.dir)
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):  # not empty (a shard in use, or new), or gone already
        (entry.dir / "shards").rmdir()


def _released(entry: CacheEntry, s: CacheEntry, v: str, views: set[str] | None) -> bool:
    """Whether shard ``s``'s copy of ``v`` may go: the entry holds the view complete with
    the rows the copy holds (a gated view's row mask goes with its view)."""
    base = v[len(HELD) :] if v.startswith(HELD) else v
    if views is not None and base not in views:
        return False
    return whole(entry, base) and _holds_as(entry, base, [(0, 0, s)])


def merge_from(entry: CacheEntry, other_root: Path, member: str) -> int:
    """Copies the shards of this entry found under another cache root (another node's
    cache.dir, copied here) that this entry does not have; returns how many."""
    src = Path(other_root) / member / entry.fingerprint / "shards"
    if not src.is_dir():
        return 0
    n = 0
    for d in sorted(src.iterdir()):
        dest = entry.dir / "shards" / d.name
        if _NAME.match(d.name) and (d / "manifest.json").is_file() and not dest.exists():
            tmp = dest.parent / f".{d.name}.copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
            tmp.replace(dest)
            n += 1
    return n
