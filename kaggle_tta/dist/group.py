"""The ranks' exchanges through the launcher's key-value store (:class:`Group`), and what a
rank does when it or another one fails.

The ranks exchange only small Python objects (the precision verdicts, a token per rank, a
summary per rank) and never tensors, through the launcher's key-value store: no NCCL or gloo
process group is made, so the same code runs on CPU-only machines and on GPUs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from kaggle_tta.config.errors import ConfigError, KaggleTTAError
from kaggle_tta.dist.ranks import PeerFailed, Ranks, one_line, store_error

# A barrier waits for the slowest rank's whole share: much longer than torch's 30 minutes on
# a big test set. A rank that fails does not leave the others waiting this long: it writes
# ``failed`` in the round's keys, and every wait (and a watcher thread, see Group) looks for
# it every SLICE seconds; a rank killed outright makes its agent stop or restart the group.
TIMEOUT = timedelta(hours=48)
JOIN_TIMEOUT = timedelta(minutes=30)  # ranks meet before any model is built (each has listed and hashed the test set)
SLICE = 2.0  # seconds: how often a waiting rank looks for a failed or restarted peer
GRACE = 2 * SLICE + 1  # seconds a failing rank waits for its peers to read why (its agent may host the store)


def lost(exc: BaseException) -> KaggleTTAError:
    """The launcher's store gone or unreachable, as one line."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return PeerFailed(
        f"lost the launcher's store at {where} ({one_line(exc)}): the agent hosting it stopped, most likely because "
        "a rank on its node failed (its message is in that node's log); fix that and run again — the cache keeps "
        "every row already computed"
    )


ROOT = "kaggle-tta"  # our keys in the launcher's store, beside its own
POLL = 0.2  # seconds between looks while the ranks meet


class Group:
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
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
            self._watcher = threading.Thread(
                target=self._watch, args=(threading.main_thread().ident,), name="kaggle-tta-ranks", daemon=True
            )
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
                "check that every node runs the same torchrun command (--nnodes, --nproc_per_node, "
                "--rdzv_endpoint) and that none has stopped"
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
            return (
                f"rank(s) {', '.join(map(str, moved))} restarted (the launcher began a new round without this rank's)"
            )
        return None

    def _stop(self, why: str) -> PeerFailed:
        self.closed = True  # one stop: the watcher's signal no longer raises
        with contextlib.suppress(Exception):  # the store gone: nothing to tell
            self.store.add("failed/seen", 1)
        return PeerFailed(
            f"{why}; this rank stopped too — fix that and run again (the cache keeps every row already computed)"
        )

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

    def _on_term(self, signum: int, frame: Any) -> None:
        """The launcher's SIGTERM (a rank died, or the job was cancelled): this rank stops
        with a line of ours, its committed rows kept, instead of vanishing without a word."""
        if self.closed:  # stopping already: as SIGTERM's default would
            raise SystemExit(128 + signum)
        self.closed = True
        raise PeerFailed(
            "stopped by the launcher (SIGTERM): another rank ended or the job was "
            "stopped; the launcher's report says which (torchrun restarts the ranks if --max-restarts allows) — "
            "the cache keeps every row already computed"
        )

    def close(self) -> None:
        """No more stops: the watcher ends (and its signal handler is put back)."""
        self.closed = True
        self._done.set()
        if self._watcher is not None:
            import signal

            self._watcher.join()
            signal.signal(signal.SIGUSR1, self._old)
            signal.signal(signal.SIGTERM, self._old_term)
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
        with quiet_stderr(replay=False), contextlib.suppress(Exception):
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
                raise KaggleTTAError(
                    f"waited {TIMEOUT} for the other ranks; one of them is stuck (its node's log says where)"
                )

    def broadcast(self, obj: Any) -> Any:
        import pickle

        k = self.key()
        if self.rank == 0:
            self.store.set(k, pickle.dumps(obj))  # type: ignore[arg-type]  # the stubs say str; the store takes bytes
        self._wait([k])
        return pickle.loads(self.store.get(k))

    def all_gather(self, obj: Any) -> list[Any]:
        import pickle

        k = self.key()
        self.store.set(f"{k}/{self.rank}", pickle.dumps(obj))  # type: ignore[arg-type]  # the stubs say str; the store takes bytes
        keys = [f"{k}/{r}" for r in range(self.world)]
        self._wait(keys)
        return [pickle.loads(v) for v in self.store.multi_get(keys)]

    def gather(self, obj: Any) -> list[Any] | None:
        import pickle

        k = self.key()
        self.store.set(f"{k}/{self.rank}", pickle.dumps(obj))  # type: ignore[arg-type]  # the stubs say str; the store takes bytes
        if self.rank != 0:
            return None
        keys = [f"{k}/{r}" for r in range(self.world)]
        self._wait(keys)
        return [pickle.loads(v) for v in self.store.multi_get(keys)]

    def barrier(self) -> None:
        k = self.key()
        if self.store.add(k, 1) == self.world:  # the last to arrive lets everyone go
            self.store.set(f"{k}/all", b"1")  # type: ignore[arg-type]  # the stubs say str; bytes work
        self._wait([f"{k}/all"])


_GROUP: list[Group] = []


def join(r: Ranks) -> None:
    """Joins the ranks' store (once per process). Whatever fails here is one line: the
    store unreachable, rank 0 (hosting it) waiting in vain for the others, a store lost."""
    if _GROUP:
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')} and WORLD_SIZE={os.environ.get('WORLD_SIZE')} are set but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "start the ranks with torchrun (it sets all of them), or unset RANK and WORLD_SIZE to run in one process"
        )
    from torch.distributed import rendezvous

    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        with quiet_stderr():  # the store's C++ client logs each failed try with a stack of frames
            store, rank, world = next(rendezvous("env://", timeout=JOIN_TIMEOUT))
    except (
        ValueError,
        RuntimeError,
        OSError,
    ) as exc:  # RuntimeError: torch's DistError, DistStoreError, DistNetworkError
        if "waiting for clients" in str(exc):  # rank 0 hosts the store (no torchrun agent) and the others never came
            raise KaggleTTAError(
                f"rank {r.rank}/{r.world} hosts the ranks' store at {where} and waited {JOIN_TIMEOUT} for the "
                f"others ({one_line(exc)}): "
                "start every rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun does), and "
                "check that they reach this machine on that port"
            ) from None
        raise KaggleTTAError(
            f"cannot reach the launcher's store at {where} (MASTER_ADDR:MASTER_PORT; {one_line(exc)}): start the "
            "ranks with torchrun, "
            "and check that every machine reaches rank 0's (the --rdzv_endpoint host) on that port"
        ) from None
    try:
        _GROUP.append(Group(store, rank, world))
    except Exception as exc:
        if store_error(exc):
            raise lost(exc) from None
        raise


@contextlib.contextmanager
def quiet_stderr(replay: bool = True) -> Iterator[None]:
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
        return lost(exc)
    if getattr(exc, "every_rank", False):  # each rank raises it itself: no one to tell
        g.settle()
        return None
    interrupted = isinstance(exc, KeyboardInterrupt)
    if interrupted:
        ignore_interrupts()
    g.fail(
        f"rank {r.rank}/{r.world} on {socket.gethostname()} "
        f"{'was interrupted' if interrupted else 'failed: ' + one_line(exc)}",
        wait=not interrupted,
    )
    return None


def ignore_interrupts() -> None:
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
