"""Test sets shipped as a zip archive (``data.folder: test.zip``: Aerial Cactus, Kuzushiji,
Dogs vs Cats lay their test images out so), read in place: no extraction, no copy on disk.

An item of an archive is named ``<archive>::<member>``; its bytes are read from the archive
(each process opens it once) and decoded as a file's would be. Ids are the members' paths
without suffix, relative to the archive's one top folder where every member is in it
(``test/123.jpg`` -> ``123``), as a folder listing's are relative to the folder. The archive's
own content digest stands for its items in the cache's fingerprint, as a record file's does.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from kaggle_tta.config.errors import DataError, shown_path

ZIP_SEP = "::"
_OPEN: dict[str, zipfile.ZipFile] = {}  # per process: archives opened once


def is_zip_item(path: str | Path) -> bool:
    return ZIP_SEP in str(path)


def is_archive(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


def list_archive(path: Path, exts: set[str], rule: Any = None) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """(ids, item names, identities) of the archive's members with a listed suffix, in path
    order (``rule``: data.id); identities are each member's (size, CRC-32), known unread."""
    where = f"data.folder ({path})"
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir() and PurePosixPath(i.filename).suffix.lower() in exts]
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: {shown_path(path)} is not a readable zip archive ({exc}); re-download it") from None
    infos.sort(key=lambda i: i.filename)
    names = [PurePosixPath(i.filename) for i in infos]
    tops = {n.parts[0] for n in names if len(n.parts) > 1}
    strip = len(tops) == 1 and all(len(n.parts) > 1 for n in names)
    ids = [str(n.relative_to(n.parts[0]) if strip else n).rsplit(".", 1)[0] for n in names]
    items = [f"{path}{ZIP_SEP}{i.filename}" for i in infos]
    if rule is not None:
        from kaggle_tta.io.ids import ids_by_rule

        ids = ids_by_rule(ids, rule.pattern, rule.template, where)
    if not ids:
        raise DataError(f"{where}: no member with a suffix in {sorted(exts)}; check data.extensions")
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{where}: id '{twice}' names two members; give data.id a pattern that tells them apart")
    empty = [i.filename for i in infos if i.file_size == 0]
    if empty:
        raise DataError(f"{where}: {shown_path(path)} holds a zero-byte image '{empty[0]}'; replace the archive")
    return ids, items, [(i.file_size, i.CRC) for i in infos]


def member_bytes(item: str) -> bytes:
    """The bytes of ``<archive>::<member>``."""
    archive, _, member = item.partition(ZIP_SEP)
    z = _OPEN.get(archive)
    try:
        if z is None:
            z = _OPEN[archive] = zipfile.ZipFile(archive)
        return z.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{shown_path(item)}: cannot read from its archive ({exc})") from None


def source(path: str) -> Any:
    """What a library reads: the path, or an archive member's bytes as a file."""
    return io.BytesIO(member_bytes(path)) if is_zip_item(path) else path
