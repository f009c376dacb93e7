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

import contextlib
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from kaggle_tta.config.errors import CacheError, ConfigError, KaggleTTAError

# A barrier waits for the slowest rank's whole share: much longer than torch's 30 minutes on
# a big test set. A rank that fails does not leave the others waiting this long: it writes
# ``failed`` in the round's keys, and every wait (and a watcher thread, see _Group) looks for
# it every SLICE seconds; a rank killed outright makes its agent stop or restart the group.
TIMEOUT = timedelta(hours=48)
JOIN_TIMEOUT = timedelta(minutes=30)  # ranks meet before any model is built (each has listed and hashed the test set)
SLICE = 2.0  # seconds: how often a waiting rank looks for a failed or restarted peer
GRACE = 2 * SLICE + 1  # seconds a failing rank waits for its peers to read why (its agent may host the store)


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
        blocks = -(-n // max(1, unit))
        lo, hi = self.rank * blocks // self.world, (self.rank + 1) * blocks // self.world
        return min(n, lo * unit), min(n, hi * unit)

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


def _lost(exc: BaseException) -> KaggleTTAError:
    """The launcher's store gone or unreachable, as one line."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return PeerFailed(
        f"lost the launcher's store at {where} ({one_line(exc)}): the agent hosting it stopped, most likely because "
        "a rank on its node failed (its message is in that node's log); fix that and run again — the cache keeps every row already computed"
    )


ROOT = "kaggle-tta"  # our keys in the launcher's store, beside its own
POLL = 0.2  # seconds between looks while the ranks meet


class _Group:
    """The ranks' exchanges, through the launcher's key-value store alone.

    Why not a gloo process group: its full mesh of TCP connections is made anew at each
    restart of an elastic group, and there it failed about one restart in two on this
    machine ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#167288
    is the same with NCCL). The store is torchrun's agent's own or, without one, hosted by
    rank 0, exactly as ``init_process_group("env://")`` would find it; every exchange here
    is a few small pickled objects under keys numbered in call order, which every rank
    makes alike.

    The agent's store outlives a restart of the group: keys of a killed round are still
    there, a rank may have died before it wrote any, and TORCHELASTIC_RESTART_COUNT may
    differ between machines. So each round names itself, by a handshake (:meth:`_meet`):
    every rank writes ``hello/<rank>`` = a nonce of its own; rank 0 makes a generation id
    and writes ``welcome/<nonce>`` = that id for each nonce it reads, until every rank has
    answered ``ack/<gen>/<rank>``. A nonce read from a dead round is never answered, so
    rank 0 reads ``hello/<rank>`` again (a restarted rank wrote a new one) and welcomes
    that. Every later key lives under ``<gen>/``, which no other round can share."""

    def __init__(self, store: Any, rank: int, world: int) -> None:
        import threading

        from torch.distributed import PrefixStore

        self.root, self.rank, self.world = store, rank, world
        gen, self.nonces = self._meet()
        self.store = PrefixStore(f"{ROOT}/{gen}", store)
        self.calls = 0
        self.stopped: str | None = None  # why the watcher stopped this rank
        self.failing = self.closed = False
        self._done = threading.Event()
        store.set_timeout(TIMEOUT)
        self._watcher = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            import signal

            self._old = signal.signal(signal.SIGUSR1, self._on_signal)
            self._watcher = threading.Thread(target=self._watch, args=(threading.main_thread().ident,), name="kaggle-tta-ranks", daemon=True)
            self._watcher.start()

    def _meet(self) -> tuple[str, list[str]]:
        """This round's generation id and every rank's nonce (in rank order)."""
        import pickle
        nonce, root = uuid.uuid4().hex, self.root
        root.set(f"{ROOT}/hello/{self.rank}", nonce)
        deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
        if self.rank != 0:
            welcome = f"{ROOT}/welcome/{nonce}"
            while not root.check([welcome]):
                self._before(deadline, "rank 0's welcome")
                time.sleep(POLL)
            gen = root.get(welcome).decode()
            root.set(f"{ROOT}/ack/{gen}/{self.rank}", nonce)
            members = f"{ROOT}/{gen}/members"
            while not root.check([members]):
                self._before(deadline, "the other ranks")
                time.sleep(POLL)
            return gen, pickle.loads(root.get(members))
        gen = uuid.uuid4().hex
        welcomed: dict[int, str] = {}  # rank -> the nonce welcomed last
        acked = {0: nonce}
        while len(acked) < self.world:
            for r in range(1, self.world):
                if r in acked or not root.check([f"{ROOT}/hello/{r}"]):
                    continue
                theirs = root.get(f"{ROOT}/hello/{r}").decode()
                if welcomed.get(r) != theirs:  # new, or a restarted rank's new nonce
                    root.set(f"{ROOT}/welcome/{theirs}", gen)
                    welcomed[r] = theirs
                ack = f"{ROOT}/ack/{gen}/{r}"
                if root.check([ack]) and root.get(ack).decode() == theirs:
                    acked[r] = theirs
            if len(acked) < self.world:
                missing = ", ".join(str(r) for r in range(self.world) if r not in acked)
                self._before(deadline, f"rank(s) {missing}")
                time.sleep(POLL)
        nonces = [acked[r] for r in range(self.world)]
        root.set(f"{ROOT}/{gen}/members", pickle.dumps(nonces))
        return gen, nonces

    def _before(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise KaggleTTAError(
                f"waited {JOIN_TIMEOUT} for {what} to join the launcher's store; "
                "check that every node runs the same torchrun command (--nnodes, --nproc_per_node, --rdzv_endpoint) and that none has stopped"
            )

    def key(self) -> str:
        self.calls += 1
        return str(self.calls)

    # ---- a failed or restarted peer ------------------------------------------------------

    def _why_stop(self) -> str | None:
        """Why this round is over for this rank (a peer failed, or restarted), else None."""
        if self.failing:
            return None
        if self.store.check(["failed"]):
            return self.store.get("failed").decode()
        hellos = self.root.multi_get([f"{ROOT}/hello/{r}" for r in range(self.world)])
        moved = [r for r, h in enumerate(hellos) if h.decode() != self.nonces[r]]
        if moved:
            return f"rank(s) {', '.join(map(str, moved))} restarted (the launcher began a new round without this rank's)"
        return None

    def _stop(self, why: str) -> PeerFailed:
        self.closed = True  # one stop: the watcher's signal no longer raises
        with contextlib.suppress(Exception):  # the store gone: nothing to tell
            self.store.add("failed/seen", 1)
        return PeerFailed(f"{why}; this rank stopped too — fix that and run again (the cache keeps every row already computed)")

    def check(self) -> None:
        """Raises PeerFailed where another rank failed or restarted."""
        why = self._why_stop()
        if why is not None:
            raise self._stop(why)

    def _watch(self, main: int) -> None:
        """Stops the main thread (SIGUSR1: :meth:`_on_signal` raises PeerFailed there, as
        Ctrl-C would raise KeyboardInterrupt; the cache keeps the rows committed) when a peer
        fails or restarts, so that a rank does not compute on to the end of its share
        before it learns of it at the barrier."""
        import signal

        while not self._done.wait(SLICE):
            try:
                why = self._why_stop()
            except Exception:  # noqa: BLE001 - the store gone: the main thread's next exchange says so
                return
            if why is not None:
                self.stopped = why
                signal.pthread_kill(main, signal.SIGUSR1)  # a real signal: a blocking call (a lock's wait) returns too
                return

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.closed and self.stopped is not None:
            raise self._stop(self.stopped)

    def close(self) -> None:
        """No more stops: the watcher ends (and its signal handler is put back)."""
        self.closed = True
        self._done.set()
        if self._watcher is not None:
            import signal

            self._watcher.join()
            signal.signal(signal.SIGUSR1, self._old)
            self._watcher = None

    def fail(self, why: str, wait: bool = True) -> None:
        """Tells the other ranks that this one failed (the first failure is the one named),
        then (``wait``) waits a little for them to read it: the agent hosting the store may
        stop as soon as this rank exits."""
        self.failing = True
        with contextlib.suppress(Exception):  # the store gone: nothing to tell
            self.store.compare_set("failed", "", why)
            end = time.monotonic() + (GRACE if wait else 0)
            while time.monotonic() < end and self.store.add("failed/seen", 0) < self.world - 1:
                time.sleep(0.1)

    def settle(self) -> None:
        """Before ranks that all failed alike exit: waits (GRACE at most) until every rank
        has read the last exchange, since the process or agent hosting the store may stop
        as soon as its rank exits, under a peer still reading."""
        # quiet: where the store's host left first, torch's C++ client logs the closed
        # connection with a stack of frames; this rank has read all it needed by then
        with _quiet_stderr(replay=False), contextlib.suppress(Exception):
            end = time.monotonic() + GRACE
            n = self.store.add("settled", 1)
            while n < self.world and time.monotonic() < end:
                time.sleep(0.05)
                n = self.store.add("settled", 0)

    def _wait(self, keys: list[str]) -> None:
        """Waits for ``keys`` in slices of SLICE seconds, looking for a failed or restarted
        peer between them; after TIMEOUT in all, one line."""
        from torch.distributed import DistStoreError

        end = time.monotonic() + TIMEOUT.total_seconds()
        while True:
            try:
                self.store.wait(keys, timedelta(seconds=SLICE))
                return
            except DistStoreError:  # this slice's timeout
                pass
            self.check()
            if time.monotonic() > end:
                raise KaggleTTAError(f"waited {TIMEOUT} for the other ranks; one of them is stuck (its node's log says where)")

    def broadcast(self, obj: Any) -> Any:
        import pickle

        k = self.key()
        if self.rank == 0:
            self.store.set(k, pickle.dumps(obj))
        self._wait([k])
        return pickle.loads(self.store.get(k))

    def all_gather(self, obj: Any) -> list[Any]:
        import pickle

        k = self.key()
        self.store.set(f"{k}/{self.rank}", pickle.dumps(obj))
        keys = [f"{k}/{r}" for r in range(self.world)]
        self._wait(keys)
        return [pickle.loads(v) for v in self.store.multi_get(keys)]

    def gather(self, obj: Any) -> list[Any] | None:
        import pickle

        k = self.key()
        self.store.set(f"{k}/{self.rank}", pickle.dumps(obj))
        if self.rank != 0:
            return None
        keys = [f"{k}/{r}" for r in range(self.world)]
        self._wait(keys)
        return [pickle.loads(v) for v in self.store.multi_get(keys)]

    def barrier(self) -> None:
        k = self.key()
        if self.store.add(k, 1) == self.world:  # the last to arrive lets everyone go
            self.store.set(f"{k}/all", b"1")
        self._wait([f"{k}/all"])


_GROUP: list[_Group] = []


def join(r: Ranks) -> None:
    """Joins the ranks' store (once per process). Whatever fails here is one line: the
    store unreachable, rank 0 (hosting it) waiting in vain for the others, a store lost."""
    if _GROUP:
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')} and WORLD_SIZE={os.environ.get('WORLD_SIZE')} are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "start the ranks with torchrun (it sets all of them), or unset RANK and WORLD_SIZE to run in one process"
        )
    from torch.distributed import rendezvous

    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        with _quiet_stderr():  # the store's C++ client logs each failed try with a stack of frames
            store, rank, world = next(rendezvous("env://", timeout=JOIN_TIMEOUT))
    except (ValueError, RuntimeError, OSError) as exc:  # RuntimeError: torch's DistError, DistStoreError, DistNetworkError
        if "waiting for clients" in str(exc):  # rank 0 hosts the store (no torchrun agent) and the others never came
            raise KaggleTTAError(
                f"rank {r.rank}/{r.world} hosts the ranks' store at {where} and waited {JOIN_TIMEOUT} for the others ({one_line(exc)}): "
                "start every rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun does), and check that they reach this machine on that port"
            ) from None
        raise KaggleTTAError(
            f"cannot reach the launcher's store at {where} (MASTER_ADDR:MASTER_PORT; {one_line(exc)}): start the ranks with torchrun, "
            "and check that every machine reaches rank 0's (the --rdzv_endpoint host) on that port"
        ) from None
    try:
        _GROUP.append(_Group(store, rank, world))
    except Exception as exc:
        if store_error(exc):
            raise _lost(exc) from None
        raise


@contextlib.contextmanager
def _quiet_stderr(replay: bool = True):
    """File descriptor 2 into a temporary file for the block: torch's C++ logging writes
    there directly, past sys.stderr. What it wrote is dropped where the block fails (the
    caller's one line says why) and, with ``replay``, written out where it succeeds."""
    import tempfile

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing to quieten
        saved = None
    if saved is None:
        yield
        return
    try:
        tmp = tempfile.TemporaryFile()
    except OSError:  # nowhere to hold it: torch's lines are left as they come
        os.close(saved)
        yield
        return
    with tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok and replay:
                tmp.seek(0)
                with contextlib.suppress(OSError):
                    os.write(2, tmp.read())


def leave() -> None:
    if _GROUP:
        _GROUP[0].close()
    _GROUP.clear()


def failed(exc: BaseException, r: Ranks) -> BaseException | None:
    """Called with what stopped this rank's part of a run: tells the other ranks (a
    ``failed`` key naming this rank; their waits and watchers stop them) and returns the
    error to raise instead where there is one (a lost store: one line)."""
    if not _GROUP:
        return None
    g = _GROUP[0]
    g.close()
    if isinstance(exc, PeerFailed):  # another rank's failure: named already
        return None
    if store_error(exc, sockets=False):
        return _lost(exc)
    if getattr(exc, "every_rank", False):  # each rank raises it itself: no one to tell
        g.settle()
        return None
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted:
        _ignore_interrupts()
    g.fail(f"rank {r.rank}/{r.world} on {socket.gethostname()} {'was interrupted' if interrupted else 'failed: ' + one_line(exc)}", wait=not interrupted)
    return None


def _ignore_interrupts() -> None:
    """After a first Ctrl-C a rank only stops: the agent forwards the terminal's SIGINT to its
    workers, and a second KeyboardInterrupt in the middle of stopping prints tracebacks."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj``, on every rank."""
    return _GROUP[0].broadcast(obj)


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    return _GROUP[0].gather(obj)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    return _GROUP[0].all_gather(obj)


def barrier() -> None:
    _GROUP[0].barrier()


def device_for(setting: str, r: Ranks) -> Any:
    """This rank's device: ``cuda:LOCAL_RANK`` where CUDA is (``auto`` or ``cuda``), else the CPU."""
    import torch

    from kaggle_tta.engine.plan import resolve_device

    if setting.startswith("cuda:"):
        raise ConfigError(f"runtime.device: '{setting}' names one GPU but {r.world} ranks run; use auto or cuda (each rank takes cuda:LOCAL_RANK)")
    device = resolve_device(setting)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if r.local_rank >= count:
            raise ConfigError(f"{r.local_world} ranks per machine but {count} CUDA device(s); start at most {count} (torchrun --nproc_per_node, runtime.devices)")
        return torch.device("cuda", r.local_rank)
    return device


def threads_for(threads: int | None, r: Ranks) -> int:
    """Torch threads of a rank on the CPU: runtime.threads, else this machine's cores shared
    among its ranks (torchrun's own default, OMP_NUM_THREADS=1, leaves cores idle where the
    ranks are fewer than the cores)."""
    from kaggle_tta.engine.plan import cpu_cores

    return threads if threads else max(1, cpu_cores() // max(1, r.local_world))


SHARED_WAIT = 10.0  # seconds a rank looks again for tokens it does not see yet (NFS caches a folder's listing a few seconds)
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
            raise every_rank(CacheError(f"cache.dir: {said}; give every rank a cache.dir it can write (on several machines, one folder they all share)"))
        missing = _look(folder, r.world, SHARED_WAIT)
        unseen = [(k, h, m) for k, h, m in all_gather((r.rank, host, missing)) if m]  # every rank has looked
    finally:
        if r.main:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    if unseen:
        k, h, m = unseen[0]
        raise every_rank(CacheError(
            f"cache.dir ({root}): the {r.world} ranks do not see one folder (machines without a shared filesystem: rank {k} on {h} "
            f"does not see the token{'s' if len(m) > 1 else ''} of rank(s) {', '.join(map(str, m))} after {SHARED_WAIT:g}s); "
            "point cache.dir at a shared disk, or run each machine alone on its share ('kaggle-tta infer PIPELINE --share K/N', "
            "with an explicit runtime.precision) and join the caches on one with 'kaggle-tta cache merge PIPELINE OTHER_CACHE_DIR'"
        ))


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
                raise every_rank(ConfigError(
                    f"rank {k}/{r.world} on {h} runs another job than rank 0 on {host0}: {field} is {_short(b)} there and {_short(a)} on rank 0; "
                    "run the same pipeline.yaml, the same --set/--overrides and the same test set on every node"
                ))


def _short(value: Any, width: int = 80) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def world_for(devices: int | str, device_setting: str) -> int:
    """Ranks for ``runtime.devices``: all = every CUDA device (1 without CUDA)."""
    if devices != "all":
        return int(devices)
    import torch

    if device_setting == "cpu" or not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count())


def launch(world: int, pipeline: Any, progress: bool) -> Any:
    """Runs ``infer`` on ``world`` ranks of this machine through torch's elastic launcher (as
    ``torchrun --standalone --nproc_per_node=world`` would) and returns rank 0's summary.
    Ctrl-C stops every rank and raises KeyboardInterrupt here (the CLI: one line, exit 130)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    conf = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn", monitor_interval=0.1,
    )
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")] + ["torch.distributed.elastic"]:
        logging.getLogger(name).setLevel(logging.ERROR)  # its INFO and WARNING lines ("Received 2 death signal") are not ours to print
    try:
        out = elastic_launch(conf, _rank_infer)(pipeline, progress)
    except ChildFailedError as exc:
        ranks = ", ".join(str(k) for k in sorted(exc.failures))
        raise KaggleTTAError(f"runtime.devices: {world} ranks started and rank(s) {ranks} failed (their message is above); fix that and run again — the cache keeps every row already computed") from None
    except SignalException as exc:
        import signal

        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise KaggleTTAError(f"runtime.devices: stopped by signal {exc.sigval.name}; the ranks were stopped — the cache keeps every row already computed") from None
    except Exception as exc:
        from torch.distributed.elastic.rendezvous import RendezvousError

        if isinstance(exc, RendezvousError) or store_error(exc):  # the launcher's own store on this machine
            raise KaggleTTAError(f"runtime.devices: torch's launcher could not start the {world} ranks ({one_line(exc)}); run again, or set runtime.devices: 1") from None
        raise
    return out[0]


def _rank_infer(pipeline: Any, progress: bool) -> Any:
    """One rank started by :func:`launch`: its share, then (rank 0) the assembly. Errors are
    one line here; a Ctrl-C says nothing (the launching process does)."""
    import sys

    from kaggle_tta.api import infer

    try:
        return infer(pipeline, progress=progress)
    except KaggleTTAError as exc:
        print(f"kaggle-tta: {current()}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        _ignore_interrupts()
        raise SystemExit(130) from None
