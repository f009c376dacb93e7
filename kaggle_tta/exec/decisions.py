"""Forward tuning decided once per member and machine, recorded beside the cache.

``forward_batch: auto`` and ``channels_last: auto`` (on a CPU in fp32) are decided by timing
a member's first chunks (forward.ChunkSizer). Timing is noisy, so two runs could decide
differently and then differ in the last bits of their logits; the decision is therefore
recorded under a key of the member's fingerprint, the precision, this machine (CPU model and
threads, or GPU name and capability) and the settings that bound the trial, and every later
run with that key reuses it without timing — in this machine's store
(``$KAGGLE_TTA_TUNING_DIR``, else ``$XDG_CACHE_HOME/kaggle-tta``, else
``~/.cache/kaggle-tta``), so that two runs into fresh caches decide alike, and beside the
cache (``<cache>/.tuning``), so that a cache moved with its decisions keeps them.

:func:`adopt` and :func:`export` carry a store, with inductor's compiled programs kept in it
(engine.compiling), from one machine to the next of its kind: the Kaggle notebook saves its
store as output and adopts the one an earlier version saved. Every key names the machine and
(for compiles) the torch version, and inductor checks its own, so nothing decided on other
hardware is ever used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.cache import locked
from kaggle_tta.cache.files import atomic_write_bytes
from kaggle_tta.config.errors import KaggleTTAError

if TYPE_CHECKING:
    import torch

    from kaggle_tta.config import RuntimeConfig

_FILE = "decisions.json"


def home() -> Path:
    """This machine's store: ``$KAGGLE_TTA_TUNING_DIR``, else ``$XDG_CACHE_HOME/kaggle-tta``, else
    ``~/.cache/kaggle-tta``."""
    return Path(
        os.environ.get("KAGGLE_TTA_TUNING_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kaggle-tta")
    )


def stores(cache_root: Path) -> list[Path]:
    """Where decisions are kept, first found first."""
    return [home(), Path(cache_root) / ".tuning"]


def machine(device: torch.device | None = None) -> str:
    """This machine (and the device used) as the forward's speed sees it."""
    import torch

    if device is not None and device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(i)}:{torch.cuda.get_device_capability(i)}"
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{platform.machine()}:{model}:{torch.get_num_threads()} threads"


def key(member_key: str, precision: str, device: torch.device, rt: RuntimeConfig, views: int) -> str:
    """The record's key: the member, its precision, the machine and device, and what bounds
    the trial (the settings; the number of views still to compute sets the size ceiling)."""
    text = json.dumps(
        [
            member_key,
            precision,
            str(device.type),
            machine(device),
            rt.forward_batch,
            rt.batch_size,
            rt.channels_last,
            views,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _write(folder: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(folder / _FILE, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


def _read(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / _FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: decided again


def recall(cache_root: Path, k: str) -> tuple[int, bool] | None:
    """The recorded (chunk size, channels_last) for ``k``, if any."""
    for folder in stores(cache_root):
        rec = _read(folder).get(k)
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("forward_batch"), int)
            and isinstance(rec.get("channels_last"), bool)
        ):
            return rec["forward_batch"], rec["channels_last"]
    return None


def remember(cache_root: Path, k: str, forward_batch: int, channels_last: bool) -> None:
    """Records a decision in every store (best effort: one that cannot be written, a
    read-only home or cache, only means deciding again there)."""
    _store(cache_root, k, {"forward_batch": int(forward_batch), "channels_last": bool(channels_last)})


def recall_verdict(cache_root: Path, k: str) -> dict[str, Any] | None:
    """A precision check's recorded verdict for ``k`` (model, precision, machine), if any."""
    for folder in stores(cache_root):
        rec = _read(folder).get(k)
        if isinstance(rec, dict) and isinstance(rec.get("ran_in"), str):
            return rec
    return None


def remember_verdict(cache_root: Path, k: str, verdict: dict[str, Any]) -> None:
    _store(cache_root, k, verdict)


def _store(cache_root: Path, k: str, record: dict[str, Any]) -> None:
    for folder in stores(cache_root):
        try:
            with locked([folder]):
                data = _read(folder)
                data[k] = record
                _write(folder, data)
        except (OSError, KaggleTTAError):
            pass


INDUCTOR = "inductor"
"""The folder of a store where inductor keeps its programs (``$TORCHINDUCTOR_CACHE_DIR`` by default)."""


def adopt(src: Path) -> int:
    """Takes into this machine's store what the store ``src`` holds and it lacks (records kept
    where both have one) and inductor's programs; returns how many records were new."""
    dest = home()
    theirs = _read(Path(src))
    with locked([dest]):
        mine = _read(dest)
        new = {k: v for k, v in theirs.items() if k not in mine}
        if new:
            _write(dest, {**mine, **new})
    if (Path(src) / INDUCTOR).is_dir():
        shutil.copytree(Path(src) / INDUCTOR, dest / INDUCTOR, dirs_exist_ok=True)
    return len(new)


def export(dest: Path) -> int:
    """Writes this machine's store (its records and inductor's programs) to ``dest``, replacing
    what was there; returns the number of records."""
    src, dest = home(), Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    data = _read(src)
    _write(dest, data)
    if (src / INDUCTOR).is_dir():
        shutil.copytree(src / INDUCTOR, dest / INDUCTOR, ignore=shutil.ignore_patterns("*.lock", "*.tmp*"))
    return len(data)
