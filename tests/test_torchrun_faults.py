"""Shards under faults, in one process (no torchrun: fast): the assembly frees the disk view by
view, removes only shards it used up, takes a shard's lock safely while another process
removes it, never assembles a damaged shard; a single process cleans up shards it did not
need. Helpers and the reference runs are tests/test_torchrun.py's."""

from __future__ import annotations

import threading
import time

import torch
from test_torchrun import _classification, _keep_threads, _same, _share  # noqa: F401 - _keep_threads: the autouse fixture

from kaggle_tta import build_plan, load_pipeline, run
from kaggle_tta.cache import CacheEntry
from kaggle_tta.dist.ranks import Ranks


def _halves(pipeline, tmp_path, name: str):
    """A reference run, then the same pipeline's two halves computed as two ranks' shares."""
    single = _classification(pipeline[1], tmp_path, "single")
    run(single, progress=False)
    p = _classification(pipeline[1], tmp_path, name)
    plan = build_plan(load_pipeline(p))
    for r in range(2):
        _, precisions = _share(plan, *Ranks(r, 2, r, 2).share(24, 4))
    return single, p, plan, precisions


def _entry(plan, name: str) -> CacheEntry:
    m = next(m for m in plan.members if m.name == name)
    return CacheEntry(plan.cache_root, m.name, m.fingerprint("fp32"), m.inputs)


def test_the_assembly_frees_each_view_once_committed_and_keeps_partial_shards(pipeline, tmp_path, monkeypatch):
    from kaggle_tta.cache import shards
    from kaggle_tta.engine.assembly import assemble_entries

    single, p, plan, precisions = _halves(pipeline, tmp_path, "freed")
    entry = _entry(plan, "a")
    # a shard holding only a partial view the entry will still lack (a killed run's): kept
    partial = entry.shard(4, 8)
    partial.open_for_write("rot90", (4, 4), "float32")
    partial.commit()
    partial.close()
    partial.save()
    seen: list[tuple[str, str, set[str]]] = []
    dense = shards._dense

    def spy(e, view, n, pieces):
        seen.append((e.member, view, {f.name.split(".")[0] for f in e.dir.glob("shards/*/*.npy")}))
        return dense(e, view, n, pieces)

    monkeypatch.setattr(shards, "_dense", spy)
    assert assemble_entries(plan, precisions).made == 10
    assert len(seen) == 10
    done: dict[str, set[str]] = {"a": set(), "b": set()}
    for member, view, files in seen:  # every view of the entry assembled before this one: no copy left in its shards
        assert not (files & done[member]), (member, view, files & done[member])
        done[member].add(view)
    left = sorted(d.name for d in (entry.dir / "shards").iterdir())
    assert left == ["000000004-000000008"] and (entry.dir / "shards" / left[0] / "manifest.json").is_file()
    assert not (_entry(plan, "b").dir / "shards").exists()
    import shutil

    shutil.rmtree(entry.dir / "shards")
    from kaggle_tta.cli import main

    assert main(["blend", str(p)]) == 0
    _same(single, p)


def test_a_shard_lock_waited_on_while_the_shard_is_removed_is_taken_afresh(tmp_path):
    """A process waiting on a shard's lock while the assembly removes that shard (its lock
    file too) must not end up holding the removed file's lock beside a newcomer holding the
    new one: it takes the lock of the file now at that path."""
    import os

    from kaggle_tta.cache.lock import remove_held as _remove
    from kaggle_tta.cache.lock import take_lock as _take
    from kaggle_tta.cache.shards import shard_lock

    folder = tmp_path / "shards" / "000000000-000000004"
    got, leave = threading.Event(), threading.Event()

    def waiter() -> None:
        with shard_lock([folder]):
            got.set()
            leave.wait(10)

    holder = _take(folder, wait=True, create=True)
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)  # the waiter blocks on the lock held here
    assert not got.is_set()
    (folder / "manifest.json").write_text("{}")
    _remove(folder)  # holding the lock: the files, then the lock, then the folder
    os.close(holder)
    assert got.wait(10)
    try:
        assert (folder / ".lock").is_file()
        assert _take(folder, wait=False, create=False) is None  # the lock at that path is the waiter's
    finally:
        leave.set()
        t.join(10)
    fd = _take(folder, wait=False, create=False)
    assert fd is not None
    os.close(fd)


def test_a_damaged_shard_is_never_assembled_and_its_rows_are_computed_again(pipeline, tmp_path, capsys):
    """A shard view whose CRC-32 fails as rank 0 copies it is marked damaged, not assembled;
    rank 0 computes that shard's rows again and assembles them: the cache ends as one
    process's."""
    from kaggle_tta.engine.shares import assemble_or_recompute as _assemble_or_recompute

    single, p, plan, precisions = _halves(pipeline, tmp_path, "damaged")
    shard = _entry(plan, "b").shard(12, 24)
    f = shard.path("rot90")
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the last row: the header and shape still read
    f.write_bytes(bytes(data))
    made = _assemble_or_recompute(plan, torch.device("cpu"), precisions, 1, "rank 0/2")
    assert made == 10
    err = capsys.readouterr().err
    assert "rot90.npy: damaged (checksum mismatch); not assembled" in err and "computing rows 12-24 again" in err, err
    from kaggle_tta.cli import main

    assert main(["blend", str(p)]) == 0
    _same(single, p)


def test_a_single_process_run_removes_the_shards_it_did_not_use(pipeline, tmp_path, capsys):
    """Rows 0-12 in a shard (a torchrun stopped half-way): one process computes every view
    whole (it assembles only shards that cover all rows) and removes the shard at the end."""
    single = _classification(pipeline[1], tmp_path, "single")
    run(single, progress=False)
    p = _classification(pipeline[1], tmp_path, "alone")
    _share(build_plan(load_pipeline(p)), 0, 12)
    assert list((tmp_path / "alone" / "cache").glob("*/*/shards"))
    run(p, progress=False)
    _same(single, p)  # no shards left
