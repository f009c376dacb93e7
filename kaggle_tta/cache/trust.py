"""Trusting an entry before a run uses it: its manifest and its row order (ids.json) intact.
A run that holds the entry's lock clears a damaged one and computes it again, in one line;
``cache verify`` names the same damage (:func:`ids_problem`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from kaggle_tta.cache.entry import CacheEntry, DamagedEntry
from kaggle_tta.cache.files import discard


def ids_problem(entry: CacheEntry, ids: list[str]) -> str | None:
    """Why this entry's row order cannot be trusted for the test set ``ids`` (None: it
    can, or nothing is written yet): ids.json missing, damaged, or another order."""
    if not entry.manifest["views"]:
        return None
    if not (entry.dir / "ids.json").is_file():
        return f"{entry.dir / 'ids.json'}: missing"
    try:
        held = entry.read_ids()
    except DamagedEntry as exc:
        return str(exc).split(";")[0]
    if held != list(ids):
        return f"{entry.dir / 'ids.json'}: other ids, or another order, than the test set's"
    return None


def checked_entry(
    root: Path, member: str, fingerprint: str, inputs: dict[str, Any], ids: list[str] | None, heal: bool
) -> CacheEntry:
    """The entry, trusted: its manifest and (``ids``: the whole test set's) ids.json intact.
    A damaged one is, with
    ``heal`` (the caller holds its lock), cleared and said so in one line, so that its rows
    are computed again; without, it stands as an empty entry (nothing of it is read)."""
    folder = Path(root) / member / fingerprint
    try:
        entry = CacheEntry(root, member, fingerprint, inputs)
        why = ids_problem(entry, ids) if ids is not None else None  # a share: the main entry's rows are others
    except DamagedEntry as exc:
        why = str(exc).split(";")[0]
    if why is None:
        return entry
    if heal:
        print(f"kaggle-tta: {why}; computing {folder} again", file=sys.stderr, flush=True)
        for name in os.listdir(folder):
            if name not in (".lock", "shards"):  # shards hold their own manifests: checked alone
                p = folder / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else discard(p)
    return CacheEntry(root, member, fingerprint, inputs, blank=True)
