"""Test sets shipped as an archive (``data.folder: test.zip``: Aerial Cactus, Kuzushiji, Dogs
vs Cats; an uncompressed tar: iNaturalist 2019's ``test2019.tar.gz``), read in place: no
extraction, no copy on disk.

An item of an archive is named ``<archive>::<member>``; its bytes are read from the archive
(each process opens it once; a tar's members by their offsets, from one pass over its
headers) and decoded as a file's would be. Ids are the members' paths without suffix,
relative to the archive's one top folder where every member is in it (``test/123.jpg`` ->
``123``), as a folder listing's are relative to the folder. The archive's own content digest
stands for its items in the cache's fingerprint, as a record file's does. A compressed tar is
refused: each member would decompress the archive up to it.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from kaggle_tta.config.errors import DataError, shown_path

ZIP_SEP = "::"
_OPEN: dict[str, zipfile.ZipFile | dict[str, tuple[int, int]]] = {}  # per process: archives opened once


def is_zip_item(path: str | Path) -> bool:
    return ZIP_SEP in str(path)


def is_archive(path: Path) -> bool:
    """A zip, or a tar (by its content, whatever its name says)."""
    return path.is_file() and (zipfile.is_zipfile(path) or _is_tar(path))


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _members(path: Path, where: str) -> list[tuple[str, int, int]]:
    """(name, size, identity) of the archive's files: a zip's CRC-32, a tar's data offset."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return [(i.filename, i.file_size, i.CRC) for i in z.infolist() if not i.is_dir()]
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"{where}: {shown_path(path)} is not a readable zip archive ({exc}); re-download it"
            ) from None
    index = _opened(str(path), where)
    assert isinstance(index, dict)
    return [(name, size, offset) for name, (offset, size) in index.items()]


def _opened(archive: str, where: str) -> zipfile.ZipFile | dict[str, tuple[int, int]]:
    """The archive, opened once per process (a replaced one again): a zip, or a tar's index,
    whose one pass over the headers serves the listing and every read."""
    st = os.stat(archive)
    key = f"{archive}\0{st.st_size}\0{st.st_mtime_ns}"
    if key not in _OPEN:
        _OPEN[key] = zipfile.ZipFile(archive) if zipfile.is_zipfile(archive) else _tar_index(archive, where)
    return _OPEN[key]


def _tar_index(path: Path | str, where: str) -> dict[str, tuple[int, int]]:
    """A tar's regular files: name -> (data offset, size), from one pass over its headers."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:2] == b"\xfd7":
        raise DataError(
            f"{where}: {shown_path(path)} is a compressed tar, which cannot be read in place; extract it "
            f"(tar xf {Path(path).name}) and point {where.split(' ')[0]} at the folder"
        )
    try:
        with tarfile.open(path, "r:") as t:
            return {m.name: (m.offset_data, m.size) for m in t if m.isfile()}
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{where}: {shown_path(path)} is not a readable tar archive ({exc}); re-download it") from None


def list_archive(path: Path, exts: set[str], rule: Any = None) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """(ids, item names, identities) of the archive's members with a listed suffix, in path
    order (``rule``: data.id); identities are each member's (size, CRC-32 or tar data offset),
    known unread."""
    where = f"data.folder ({path})"
    infos = sorted(m for m in _members(path, where) if PurePosixPath(m[0]).suffix.lower() in exts)
    names = [PurePosixPath(i[0]) for i in infos]
    tops = {n.parts[0] for n in names if len(n.parts) > 1}
    strip = len(tops) == 1 and all(len(n.parts) > 1 for n in names)
    ids = [str(n.relative_to(n.parts[0]) if strip else n).rsplit(".", 1)[0] for n in names]
    items = [f"{path}{ZIP_SEP}{i[0]}" for i in infos]
    if rule is not None:
        from kaggle_tta.io.ids import ids_by_rule

        ids = ids_by_rule(ids, rule.pattern, rule.template, where)
    if not ids:
        raise DataError(f"{where}: no member with a suffix in {sorted(exts)}; check data.extensions")
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{where}: id '{twice}' names two members; give data.id a pattern that tells them apart")
    empty = [i[0] for i in infos if i[1] == 0]
    if empty:
        raise DataError(f"{where}: {shown_path(path)} holds a zero-byte image '{empty[0]}'; replace the archive")
    return ids, items, [(i[1], i[2]) for i in infos]


def archive_items(archive: Path, rel: list[str], where: str) -> tuple[list[str], list[tuple[int, int]]]:
    """``data.csv.root`` an archive: each listed path's member, by its name, else by the path
    with leading folders dropped (iNaturalist's ``test2019/x.jpg`` in ``test2019.tar.gz``,
    whose members are ``x.jpg``); (item names, identities)."""
    members = {PurePosixPath(name).as_posix(): (name, size, check) for name, size, check in _members(archive, where)}
    items, identities, named = [], [], dict[str, str]()
    for r in rel:
        parts = PurePosixPath(r.replace("\\", "/")).parts
        name = next(("/".join(parts[k:]) for k in range(len(parts)) if "/".join(parts[k:]) in members), None)
        if name is None:
            raise DataError(
                f"{where}: '{r}' is not in {shown_path(archive)} (members such as {sorted(members)[:2]}); check "
                "the path column and data.csv.root"
            )
        if named.setdefault(name, r) != r:
            raise DataError(f"{where}: '{named[name]}' and '{r}' both name the member '{name}'; check the paths")
        real, size, check = members[name]
        items.append(f"{archive}{ZIP_SEP}{real}")
        identities.append((size, check))
    return items, identities


def member_bytes(item: str) -> bytes:
    """The bytes of ``<archive>::<member>``."""
    archive, _, member = item.partition(ZIP_SEP)
    try:
        z = _opened(archive, item)
        if isinstance(z, zipfile.ZipFile):
            return z.read(member)
        offset, size = z[member]
        with open(archive, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{shown_path(item)}: cannot read from its archive ({exc})") from None


def source(path: str) -> Any:
    """What a library reads: the path, or an archive member's bytes as a file."""
    return io.BytesIO(member_bytes(path)) if is_zip_item(path) else path
