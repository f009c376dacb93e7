"""Several ranks on one cache: torchrun's processes, or ours through its launcher.

``torchrun --nproc_per_node=N -m kaggle_tta run pipeline.yaml`` (and the same across machines
with ``--nnodes`` and a c10d rendezvous) starts N processes per machine; each finds its
place here (:func:`current`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, which torchrun's
elastic agent sets) and computes a contiguous share of the test set (:meth:`Ranks.share`;
not DistributedSampler, which pads a short last share by repeating images) into shard
entries of the shared cache (kaggle_tta.cache.shards). After a barrier rank 0 assembles the
shards into the entries and blends; the other ranks exit 0.

``runtime.devices: all | N`` makes a plain ``kaggle-tta run`` start the ranks itself through
the same launcher (:func:`launch`: torch.distributed.launcher's ``elastic_launch``, which is
what torchrun calls), so a notebook cell uses both of Kaggle's T4s.

The ranks exchange only small Python objects (the precision verdicts, a token per rank, a
summary per rank) and never tensors, through the launcher's key-value store (see
:class:`_Group`): no NCCL or gloo process group is made, so the same code runs on CPU-only
machines and on GPUs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kaggle_tta.config.errors import KaggleTTAError
from kaggle_tta.dist.group import ignore_interrupts
from kaggle_tta.dist.ranks import current, one_line, store_error


def launch(world: int, target: Callable[..., Any], *args: Any) -> Any:
    """Runs ``target(*args)`` on ``world`` ranks of this machine through torch's elastic launcher (as
    ``torchrun --standalone --nproc_per_node=world`` would) and returns rank 0's summary.
    Ctrl-C stops every rank and raises KeyboardInterrupt here (the CLI: one line, exit 130)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    conf = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
        monitor_interval=0.1,
    )
    restore = _quiet_torch()
    try:
        out = elastic_launch(conf, _rank_main)(target, *args)
    except ChildFailedError as exc:
        ranks = ", ".join(str(k) for k in sorted(exc.failures))
        raise KaggleTTAError(
            f"runtime.devices: {world} ranks started and rank(s) {ranks} failed (their message is above); fix that and "
            "run again — the cache keeps every row already computed"
        ) from None
    except SignalException as exc:
        import signal

        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise KaggleTTAError(
            f"runtime.devices: stopped by signal {exc.sigval.name}; the ranks were stopped — the cache keeps every row "
            "already computed"
        ) from None
    except Exception as exc:
        from torch.distributed.elastic.rendezvous import RendezvousError

        if isinstance(exc, RendezvousError) or store_error(exc):  # the launcher's own store on this machine
            raise KaggleTTAError(
                f"runtime.devices: torch's launcher could not start the {world} ranks ({one_line(exc)}); run again, or "
                "set runtime.devices: 1"
            ) from None
        raise
    finally:
        restore()
    return out[0]


def _quiet_torch() -> Callable[[], None]:
    """Leaves the ranks' failures to our own lines: torch's launcher logs each failed rank
    with a traceback through its own frames (ERROR), its spawn module the ranks it
    terminates, and the store's C++ client each slow poll; a rank's own message, and the
    launching process's line naming the failed ranks, say all of it. A user's own
    TORCH_CPP_LOG_LEVEL wins; the multiprocessing resource tracker's leaked-semaphore
    warning (a terminated rank's, harmless) is not printed after our line."""
    import logging
    import os
    import sys

    prefixes = ("torch.distributed.elastic", "torch.multiprocessing")
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    levels = {name: logging.getLogger(name).level for name in [*names, *prefixes]}
    for name in levels:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    had_level = "TORCH_CPP_LOG_LEVEL" in os.environ
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # read by each spawned rank's torch
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    added = quiet not in sys.warnoptions
    if added:  # handed to the tracker process when it starts
        sys.warnoptions.append(quiet)

    def restore() -> None:  # the caller's process as it was (a notebook goes on after the run)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if not had_level:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
        if added and quiet in sys.warnoptions:
            sys.warnoptions.remove(quiet)

    return restore


def _rank_main(target: Callable[..., Any], *args: Any) -> Any:
    """One rank started by :func:`launch`: ``target(*args)`` (the caller's function: for a run,
    its share and, on rank 0, the assembly). Errors are one line here; a Ctrl-C says nothing
    (the launching process does)."""
    import sys

    try:
        return target(*args)
    except KaggleTTAError as exc:
        print(f"kaggle-tta: {current()}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        ignore_interrupts()
        raise SystemExit(130) from None
