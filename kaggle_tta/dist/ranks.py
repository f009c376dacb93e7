"""This process's place among the ranks, read once from the launcher's environment, and the
device and threads that place gives it.

torchrun (and ``runtime.devices``, through the same launcher) sets RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE; :func:`current` reads them into one :class:`Ranks`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from kaggle_tta.config.errors import ConfigError, KaggleTTAError
from kaggle_tta.engine.shares import share_rows


class PeerFailed(KaggleTTAError):
    """Another rank failed or restarted: this one stops too (the cache keeps its rows)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, unit: int = 1) -> tuple[int, int]:
        """Rows ``lo:hi`` of an ``n``-row test set this rank computes: contiguous, every row
        in exactly one share (none repeated), made of whole ``unit``-row blocks (the loader's
        batches) whose counts differ by at most one. Whole batches: each rank then decodes and
        forwards the very batches (and chunks of them) one process would, so the cache is
        bit-identical to one process's; a share cut mid-batch packs other chunks, and
        convolutions of other batch shapes differ in the last bits."""
        return share_rows(n, self.rank, self.world, unit)

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


def current() -> Ranks | None:
    """This process's ranks when a launcher started more than one (else None)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except (KeyError, ValueError):
        return None
    return Ranks(rank, world, local, local_world)


def one_line(exc: BaseException) -> str:
    """An exception as one line: our own errors as they read, others with their type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return text if isinstance(exc, KaggleTTAError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def store_error(exc: BaseException, sockets: bool = True) -> bool:
    """Whether ``exc`` is the launcher's store failing (torch's DistError: DistStoreError,
    DistNetworkError; with ``sockets``, a socket's timeout or reset too), not a fault of ours
    or the user's. ``sockets`` only where every call in the block is the store's (joining):
    elsewhere a socket error may be a model factory's download, and a rank that fails so
    must tell the others like any failure."""
    if sockets and isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    torch_dist = sys.modules.get("torch.distributed")
    error = getattr(torch_dist, "DistError", None)
    return error is not None and isinstance(exc, error)


def every_rank(exc: KaggleTTAError) -> KaggleTTAError:
    """Marks an error that every rank finds alike and raises itself (the job's settings, a
    cache.dir not shared): no rank needs to be told of it (see :func:`failed`)."""
    exc.every_rank = True  # type: ignore[attr-defined]
    return exc


def device_for(setting: str, r: Ranks) -> Any:
    """This rank's device: ``cuda:LOCAL_RANK`` where CUDA is (``auto`` or ``cuda``), else the CPU."""
    import torch

    from kaggle_tta.engine.device import resolve_device

    if setting.startswith("cuda:"):
        raise ConfigError(
            f"runtime.device: '{setting}' names one GPU but {r.world} ranks run; use auto or cuda (each rank takes "
            "cuda:LOCAL_RANK)"
        )
    device = resolve_device(setting)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if r.local_rank >= count:
            raise ConfigError(
                f"{r.local_world} ranks per machine but {count} CUDA device(s); start at most {count} (torchrun "
                "--nproc_per_node, runtime.devices)"
            )
        return torch.device("cuda", r.local_rank)
    return device


def threads_for(threads: int | None, r: Ranks) -> int:
    """Torch threads of a rank on the CPU: runtime.threads, else this machine's cores shared
    among its ranks (torchrun's own default, OMP_NUM_THREADS=1, leaves cores idle where the
    ranks are fewer than the cores)."""
    from kaggle_tta.engine.device import cpu_cores

    return threads if threads else max(1, cpu_cores() // max(1, r.local_world))
