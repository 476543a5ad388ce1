"""The memory manager: every GPU byte a session holds, a VRAM budget, and a host pool to page into.

Invariants:
- Paging is storage-level. A session's tensors (KV cache, the paused activation) are copied storage by
  storage, each into its own contiguous host extent, then each storage is ``resize_(0)``-ed. Every view of it (the
  paused forward's local variables included) stays valid and sees the same bytes after ``resize_`` back and
  the copy home. Nothing is lost: the host extent is freed only after the copy back has completed.
- Page-out and page-in are all-or-nothing. A page-out copies every storage to the host before it frees any;
  if anything fails, what was freed is restored from those copies and the session is exactly as before. A
  page-in frees the host extents only after every storage is back; on failure the session stays paged. If an
  undo itself fails the session is marked ``lost`` and every later use raises ``SessionLostError`` instead of
  touching freed memory. A spilled session is paged in from its file through a small ring of staging blocks
  pinned once with the manager (spill.py), not through the host pool, so a resume from disk never spills another
  session on its way: each block is copied on to the device as soon as it is read, and its staging block is read
  into again only once that copy is done. Its file is removed only once all of it is back; a failed read leaves
  it spilled, its file as it was, and frees the device storages only after the copies queued from it finished.
- Only a session whose executor is blocked (paused) or has no run may be paged; a running forward is never
  touched. The engine reports a new run (``admit``) and every move of a run (``on_run``), and whether the session
  may be paged follows from the run's state (``RunState.pageable``); it holds the manager's lock (``resident``)
  around every read or edit of session tensors, so a page-out never races a reader or writer. Nothing handed
  to a caller aliases session memory: the engine answers with copies made inside ``resident``.
- One lock, the innermost of the engine's lock order: the manager never calls code that takes another lock
  (``tensors`` callbacks only list tensors), so it cannot be part of a deadlock.
- The lock is not held while bytes cross PCIe or go to disk. A page-out or page-in marks its session ``moving``,
  queues its copies on a side stream and waits for them through the lock's condition (which releases it), so
  other sessions' admissions, growth checks and reads go on meanwhile; the scheduler's decode loop never waits
  for another session's copy. A spill is the same: the session spilled is marked ``moving`` while its host
  extents are written to its file on the spill worker, so nobody pages it in, drops or releases it (or spills it
  twice) until the file is whole and its extents are freed. A page-out that needs pool room when nobody can be
  spilled now waits for a move under way that will make some (a spill, a page-in from the host, a page-out
  already copying); none of those waits for room, so the waits cannot form a cycle. Whatever touches a
  session's storages or extents first waits until it is no longer moving, and a session being admitted, paged
  in or held by ``resident`` is never picked as a victim for a page-out (``holds``). Each kind of move has its
  own worker (and stream): a page-in from the host never queues behind another session's disk read or write.
- Admission reserves: a run is admitted with the device bytes it will need (``admit``), paging others out
  first; only the new request can get ``OutOfMemoryError``. A running run is never failed for memory.
- Stream order on CUDA: a copy stream first waits for the compute stream (a page-out's bytes are final; a
  page-in's freshly allocated blocks are no longer read by queued kernels of their previous owner). The host
  waits for the copy's event before the operation completes: a page-out frees the storage only then, and a
  page-in returns (so the session's next kernels are queued) only then. The compute stream itself never waits
  for a copy, so other sessions' steps are not held up by it. A page-in that fails waits for the copies it had
  queued before it frees their device storages (and before a disk page-in's staging blocks are read into again).
- The host pool is pinned in large chunks, up front or when it grows, never per copy (pinning costs ~0.6 s
  per GiB). When even the pool is full, the request that needs room gets ``OutOfMemoryError`` and every
  session keeps what it had.
- Policies only choose; the manager does the moving. ``PagingPolicy`` decides what to page on a pause, on a
  session's IO-wait signal (policies.py, phases.py) and which sessions to evict under pressure, so new policies
  plug in without touching the mechanism.
- Phase signals are epoch-checked under the lock: ``io_wait`` starts an epoch, and any run or ``compute``
  ends it, so a signalled page-out or prefetch that a background worker carries out late does nothing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .run_state import RunState
from .errors import InvalidArgumentError, OutOfMemoryError, PagingError, SessionClosedError, SessionLostError
from .host_pool import GiB, MiB, Extent, HostPool
from .spill import Fence, Piece, SpillFile, SpillStore


Copy = Callable[[torch.Tensor, torch.Tensor], None]  # queues one copy, dst <- src


def parse_bytes(text: str | int) -> int:
    """``"16GiB"``, ``"512MiB"``, ``"2G"``, ``"1e9"`` or an int, as bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        units = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
        s = text.strip().lower().removesuffix("ib").removesuffix("b")
        scale = units.get(s[-1:], 1) if s else 1
        try:
            value = int(float(s[:-1] if s[-1:] in units else s) * scale)
        except ValueError:
            raise InvalidArgumentError(f"{text!r} is not a size; write e.g. 16GiB, 512MiB or a byte count") from None
    else:
        raise InvalidArgumentError(f"{text!r} is not a size")
    if value < 0:
        raise InvalidArgumentError(f"a size cannot be negative: {text!r}")
    return value


def unique_storages(tensors: Iterable[torch.Tensor]) -> list[torch.UntypedStorage]:
    """Each distinct live storage once (views share one), skipping storages already paged out (size 0)."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            seen.setdefault(storage.data_ptr(), storage)
    return list(seen.values())


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass
class SessionMemory:
    """What the manager knows of one session. Every field is read and written under the manager's lock."""

    sid: int
    tensors: Callable[[], list[torch.Tensor]]
    pageable: bool = False
    reserved: int = 0  # device bytes promised to the session's live run at admission
    last_used: float = field(default_factory=time.monotonic)
    paged: list[tuple[torch.UntypedStorage, Extent]] = field(default_factory=list)
    # On the disk tier instead: the paged storages, in the order of the file's extents, and the file.
    spilled: tuple[list[torch.UntypedStorage], SpillFile] | None = None
    lost: str | None = None  # why the session's state could not be restored, once that happened
    io_until: float | None = None  # in an IO wait: when it expects to run again (inf: no hint); None: computing
    io_epoch: int = 0  # bumped by every io_wait and every end of one (see ``mark_io_wait``)
    moving: str | None = None  # "out", "in" or "spill" while its bytes move with the manager's lock released
    holds: int = 0  # admissions, page-ins and ``resident`` blocks under way: never a victim meanwhile
    counted: int | None = None  # ``resident_bytes`` as last walked, while nothing can change them (see there)

    @property
    def is_paged(self) -> bool:
        return bool(self.paged) or self.spilled is not None

    def disk_bytes(self) -> int:
        return 0 if self.spilled is None else self.spilled[1].nbytes

    def resident_bytes(self) -> int:
        """Walking a session's tensors costs ~1 us each, and a budget check walks every session (100 paused 13B
        sessions: ~4 ms before each page-in). While its run is not running (``pageable``) only the manager's
        own moves and the engine's ``resident`` blocks change them, and each calls ``changed``: the count holds
        until then."""
        if self.counted is not None and self.pageable:
            return self.counted
        value = sum(s.nbytes() for s in unique_storages(self.tensors()))
        self.counted = value if self.pageable else None
        return value

    def changed(self) -> None:
        self.counted = None

    def host_bytes(self) -> int:
        return sum(extent.nbytes for _, extent in self.paged)

    def paged_bytes(self) -> int:
        return self.host_bytes() + self.disk_bytes()

    def charge(self) -> int:
        """Device bytes counted against the budget: what it holds, or what its run was promised if more."""
        return 0 if self.is_paged and self.moving != "in" else max(self.reserved, self.resident_bytes())


@dataclass(frozen=True)
class Transfer:
    """What one page-out or page-in moved: ``seconds`` is the copies alone (CUDA events on the copy stream,
    after it waited for compute); ``wall_seconds`` adds bookkeeping, allocation and the wait for compute;
    ``call_seconds`` the whole call, of which ``room_seconds`` making room on the device (a page-in) and the rest
    beyond ``wall_seconds`` waiting for the manager's lock and for the session to settle."""

    sid: int
    direction: str
    nbytes: int
    copies: int
    seconds: float
    wall_seconds: float
    call_seconds: float
    room_seconds: float = 0.0


class PagingPolicy(Protocol):
    name: str

    def page_on_pause(self, session: SessionMemory) -> bool: ...

    def victims(self, sessions: list[SessionMemory], exclude: int | None) -> list[SessionMemory]: ...

    def page_on_io_wait(self, session: SessionMemory, expected_s: float | None, swap_s: float) -> tuple[bool, str]:
        """Whether a session that signals an IO wait is paged out now (``swap_s``: the estimated round trip),
        and why, in words for the caller."""
        ...

    def prefetch(self, session: SessionMemory) -> bool:
        """Whether a paged session in an IO wait with a hint is paged back in just before it expects to run."""
        ...


class LRUPolicy:
    """Page out only under pressure, least recently used first; ``eager`` also pages every pause at once.
    Phase signals are ignored: this is the reactive baseline."""

    name = "lru"

    def __init__(self, eager: bool = False) -> None:
        self.eager = eager

    def page_on_pause(self, session: SessionMemory) -> bool:
        return self.eager

    def page_on_io_wait(self, session: SessionMemory, expected_s: float | None, swap_s: float) -> tuple[bool, str]:
        return False, "the lru policy ignores phase signals and pages only under pressure"

    def prefetch(self, session: SessionMemory) -> bool:
        return False

    def victims(self, sessions: list[SessionMemory], exclude: int | None) -> list[SessionMemory]:
        candidates = [s for s in sessions if s.sid != exclude and s.pageable and not s.is_paged]
        return sorted(candidates, key=lambda s: s.last_used)


class MemoryManager:
    """Accounts session bytes on the device against ``budget`` and pages sessions to the host pool and back.

    One lock guards all of it (sessions, reservations, paging), and the manager calls out to nothing that takes
    another lock: it is the innermost lock of the engine's order (see engine.py), so it cannot deadlock.
    """

    def __init__(
        self,
        device: torch.device,
        budget: int,
        host_capacity: int,
        policy: PagingPolicy | None = None,
        chunk_bytes: int = GiB,
        host_reserve: int = 0,
        budget_from_free_memory: bool = False,
        spill: SpillStore | None = None,
    ) -> None:
        """``budget_from_free_memory``: the budget was measured as free device memory before any model was
        loaded, so each model's weights are taken out of it as it loads (``weights_loaded``); otherwise the
        budget is what the operator asked for (``--gpu-memory``) and is kept as given. ``spill``: the disk tier
        that takes paged sessions when the host pool is full (none: the pool's limit is the last word)."""
        self.device = torch.device(device)
        self.budget = budget
        self.budget_from_free_memory = budget_from_free_memory
        self.policy = policy or LRUPolicy()
        self.pool = HostPool(host_capacity, chunk_bytes, pin=self.device.type == "cuda", reserve=host_reserve)
        self.spill = spill
        self.spills = 0
        self.unspills = 0
        self._sessions: dict[int, SessionMemory] = {}
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # notified when a session stops moving or a copy completes
        self.transfers: deque[Transfer] = deque(maxlen=1024)
        self.page_outs = 0
        self.page_ins = 0
        self.overcommits = 0  # times a running session outgrew its reservation and nothing could be paged
        self.growth_page_outs = 0  # page-outs made for a running session that outgrew its reservation (on its path)
        self._copying_out = 0  # page-outs that hold all their host extents and are copying into them
        self._cuda = self.device.type == "cuda"
        # One worker per lane: page-outs ("out"), page-ins from the host ("in") and from disk ("disk", reads and
        # copies), spill writes ("spill"), so none queues behind another's bytes; each copying lane has its stream.
        self._workers: dict[str, _Worker] = {}
        self._streams = {lane: torch.cuda.Stream(self.device) for lane in ("out", "in", "disk")} if self._cuda else {}
        # Disk page-ins read through this, one at a time (the "disk" worker): pinned now, never on the swap path.
        self._staging = [] if spill is None else spill.staging(pin=self._cuda)

    def weights_loaded(self, nbytes: int) -> None:
        with self._lock:
            if self.budget_from_free_memory:
                self.budget = max(self.budget - nbytes, 0)

    # registration and state ------------------------------------------------------------------------------
    def register(self, sid: int, tensors: Callable[[], list[torch.Tensor]]) -> None:
        with self._lock:
            self._sessions[sid] = SessionMemory(sid, tensors, pageable=True)

    def release(self, sid: int) -> None:
        """Forget a session: its host extents go back to the pool (its device tensors die with it)."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                self._cond.wait_for(lambda: session.moving is None and session.holds == 0)
                self._sessions.pop(sid, None)
                self._drop_paged(session)

    def session(self, sid: int) -> SessionMemory:
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise SessionClosedError(f"session {sid} was closed; its memory is released")
        return session

    def _settled(self, sid: int) -> SessionMemory:
        """The session once no copy of it is under way (waiting releases the lock; the caller holds it)."""
        session = self.session(sid)
        self._cond.wait_for(lambda: session.moving is None)
        return session

    @contextlib.contextmanager
    def _held(self, sid: int) -> Iterator[SessionMemory]:
        """The live, settled session, kept from being paged out by anyone else for the block."""
        session = self._live(sid)
        session.holds += 1
        session.changed()
        try:
            yield session
        finally:
            session.holds -= 1
            session.changed()  # the holder may have changed its tensors (a page-in, a fork, a rewind, an edit)
            self._cond.notify_all()

    @contextlib.contextmanager
    def _moving(self, session: SessionMemory, kind: str) -> Iterator[None]:
        """Mark the session's bytes as moving (``kind``) for the block; whoever waits for it is woken after."""
        session.moving = kind
        session.changed()
        try:
            yield
        finally:
            session.moving = None
            session.changed()
            self._cond.notify_all()

    def _live(self, sid: int) -> SessionMemory:
        session = self._settled(sid)
        if session.lost is not None:
            raise SessionLostError(
                f"session {sid} lost its paged state ({session.lost}); close it and open a new one"
            )
        return session

    def on_run(self, sid: int, state: RunState) -> None:
        """A move of the session's run (run_state.py). Whether the session may be paged follows from ``state``
        alone; a pause may page it at once (the policy's choice); an ended run returns its reservation and
        leaves its context pageable like any idle state; a running run ends any IO wait the session signalled."""
        with self._lock:
            session = self._settled(sid)
            session.pageable = state.pageable
            session.changed()
            session.last_used = time.monotonic()
            if state is RunState.RUNNING:
                _end_io_wait(session)
            if state.ended:
                session.reserved = 0
            elif state is RunState.PAUSED and session.lost is None and self.policy.page_on_pause(session):
                try:
                    self.page_out(sid)
                except (OutOfMemoryError, PagingError):
                    pass  # paging on pause is an optimisation: the session stays resident and correct

    def admit(self, sid: int, need: int) -> None:
        """Make the session resident and reserve ``need`` device bytes in all for a new run (its kept context
        included), paging others out first; the run then never waits for room.

        ``OutOfMemoryError`` when even paging cannot make room; then nothing has changed.
        """
        with self._lock, self._held(sid) as session:
            _end_io_wait(session)
            self.page_in(sid)
            self._make_room(max(need - session.charge(), 0), for_sid=sid)
            session.reserved = need
            session.pageable = RunState.RUNNING.pageable  # the run it admits starts running
            session.changed()
            session.last_used = time.monotonic()

    def drop(self, sid: int) -> None:
        """The session discards its state (a fresh conversation): host copies of it go back to the pool."""
        with self._lock:
            session = self._settled(sid)
            self._drop_paged(session)
            session.changed()

    def make_room(self, need: int, for_sid: int | None = None) -> None:
        """Page others out until ``need`` more bytes fit (e.g. for a fork's copy); ``OutOfMemoryError`` if not."""
        with self._lock:
            self._make_room(need, for_sid)

    def _drop_paged(self, session: SessionMemory) -> None:
        for _, extent in session.paged:
            self.pool.free(extent)
        session.paged = []
        if session.spilled is not None:
            self.spill.remove(session.spilled[1])
            session.spilled = None

    # the disk tier --------------------------------------------------------------------------------------
    def _host_extent(self, nbytes: int, for_sid: int) -> Extent:
        """A host extent, spilling the least recently used sessions paged to the host while the pool is full, or,
        when nobody can be spilled now, waiting for a move under way that will free room or leave a session to
        spill (each move releases the lock while its bytes move)."""
        while True:
            try:
                return self.pool.alloc(nbytes)
            except OutOfMemoryError:
                if self.spill is None:
                    raise
                victims = [s for s in self._sessions.values()
                           if s.paged and s.sid != for_sid and s.lost is None and s.moving is None]
                if victims:
                    self._spill_out(min(victims, key=lambda s: s.last_used))
                elif self._room_coming():
                    self._cond.wait()
                else:
                    raise

    def _room_coming(self) -> bool:
        """Whether a move under way will free pool room or leave a session paged to the host: a spill, a page-in
        from the host, or a page-out past taking its extents. None of them waits for pool room, so waiting for
        them cannot close a cycle."""
        return self._copying_out > 0 or any(
            s.moving == "spill" or (s.moving == "in" and s.paged) for s in self._sessions.values()
        )

    def _spill_out(self, session: SessionMemory) -> None:
        """Move a host-paged session to a file, written whole (with the lock released) before any extent is freed."""
        with self._moving(session, "spill"):
            views = [extent.view for _, extent in session.paged]
            written: list[SpillFile] = []
            try:
                self._unlocked("spill", lambda: written.append(self.spill.write(session.sid, views)))
            except BaseException:
                for spilled in written:  # interrupted once the file was whole: the session keeps its extents
                    self.spill.remove(spilled)
                raise
            storages = [storage for storage, _ in session.paged]
            for _, extent in session.paged:
                self.pool.free(extent)
            session.paged, session.spilled = [], (storages, written[0])
            self.spills += 1

    def resident_total(self) -> int:
        with self._lock:
            return sum(s.resident_bytes() for s in self._sessions.values())

    def charged_total(self) -> int:
        with self._lock:
            return sum(s.charge() for s in self._sessions.values())

    @contextlib.contextmanager
    def resident(self, sid: int) -> Iterator[None]:
        """Hold the session's state on the device for the block (paged in first); nothing pages it meanwhile."""
        with self._lock, self._held(sid):
            self.page_in(sid)
            yield

    # pressure -------------------------------------------------------------------------------------------
    def _make_room(self, need: int, for_sid: int | None) -> None:
        """Page out the sessions the policy picks until ``need`` more bytes fit in the budget, else raise."""
        if self._evict_until(need, for_sid):
            return
        raise OutOfMemoryError(
            f"the GPU budget of {self.budget / MiB:.1f} MiB cannot hold {need / MiB:.1f} MiB more "
            f"({self.charged_total() / MiB:.1f} MiB held or promised to runs that cannot be paged now); finish or "
            f"close a session, or start the daemon with a larger --gpu-memory"
        )

    def _evict_until(self, need: int, for_sid: int | None, on_growth: bool = False) -> bool:
        if self.charged_total() + need <= self.budget:
            return True
        for victim in self.policy.victims(list(self._sessions.values()), for_sid):
            # Each page-out releases the lock while it copies, so the list may be stale: check again.
            current = self._sessions.get(victim.sid) is victim and victim.lost is None
            if current and victim.moving is None and victim.holds == 0:
                if self.page_out(victim.sid) is not None and on_growth:
                    self.growth_page_outs += 1
                if self.charged_total() + need <= self.budget:
                    return True
        return False

    def on_growth(self, sid: int) -> None:
        """Called by a running session between forwards. Never fails the run: it was admitted with a reservation,
        and when it outgrows that (an estimate), others are paged out if they can be; else the budget bends."""
        with self._lock:
            session = self.session(sid)
            session.changed()
            held = session.resident_bytes()
            if held <= session.reserved:
                return
            session.reserved = held
            if not self._evict_until(0, for_sid=sid, on_growth=True):
                self.overcommits += 1

    def prefilled(self, sid: int, need: int) -> None:
        """The run's prompt forward is over: its reservation falls to ``need`` (its KV for the whole run), so
        the room its prefill activations took goes back to other sessions (prefill.py)."""
        with self._lock:
            session = self.session(sid)
            session.reserved = min(session.reserved, max(need, session.resident_bytes()))

    # moving ---------------------------------------------------------------------------------------------
    def page_out(self, sid: int) -> Transfer | None:
        """Copy every storage of the session to the host, then free them: all of it, or (on any error) none."""
        called = time.perf_counter()
        with self._lock:
            session = self._live(sid)
            if session.is_paged or not session.pageable or session.holds:
                return None
            with self._moving(session, "out"):
                return self._page_out(session, called)

    def _page_out(self, session: SessionMemory, called: float) -> Transfer | None:
        sid = session.sid
        storages = unique_storages(session.tensors())
        total = sum(s.nbytes() for s in storages)
        if total == 0:
            return None
        fixed = [s for s in storages if not s.resizable()]
        if fixed:
            raise PagingError(
                f"session {sid} holds {len(fixed)} tensor(s) whose memory cannot be freed (an outside buffer "
                f"aliases it); nothing was paged"
            )
        start = time.perf_counter()
        plan: list[tuple[torch.UntypedStorage, Extent]] = []
        try:
            for storage in storages:
                plan.append((storage, self._host_extent(storage.nbytes(), sid)))
            self._copying_out += 1
            try:
                seconds = self._copy([(e.view, _bytes_view(s)) for s, e in plan], "out")
            finally:
                self._copying_out -= 1
        except BaseException:
            for _, extent in plan:
                self.pool.free(extent)
            raise
        freed: list[tuple[torch.UntypedStorage, Extent]] = []
        try:
            for storage, extent in plan:
                storage.resize_(0)
                freed.append((storage, extent))
        except BaseException as exc:
            self._undo_page_out(session, freed, plan)
            raise PagingError(f"paging session {sid} out failed ({exc}); nothing was paged") from exc
        session.paged = plan
        end = time.perf_counter()
        transfer = Transfer(sid, "out", total, len(plan), seconds, end - start, end - called)
        self.transfers.append(transfer)
        self.page_outs += 1
        return transfer

    def _undo_page_out(
        self,
        session: SessionMemory,
        freed: list[tuple[torch.UntypedStorage, Extent]],
        plan: list[tuple[torch.UntypedStorage, Extent]],
    ) -> None:
        """Put back the storages a failed page-out had already freed, from their host copies."""
        try:
            for storage, extent in freed:
                storage.resize_(extent.nbytes)
            self._copy([(_bytes_view(s), e.view) for s, e in freed], "in")
        except BaseException as exc:  # noqa: BLE001 - the state cannot be rebuilt: say so on every later use
            session.lost = f"a failed page-out could not be undone: {type(exc).__name__}: {exc}"
            session.paged = plan
            return
        for _, extent in plan:
            self.pool.free(extent)

    def page_in(self, sid: int) -> Transfer | None:
        """Bring a paged session back (making room first), from the host pool or, for a spilled one, from its file
        through the staging ring, each block copied on to the device as soon as it is read: all of it, or (on any
        error) it stays paged where it was."""
        called = time.perf_counter()
        with self._lock, self._held(sid) as session:
            session.last_used = time.monotonic()
            if not session.is_paged:
                return None
            total = session.paged_bytes()
            room = time.perf_counter()
            self._make_room(max(total, session.reserved), for_sid=sid)
            room = time.perf_counter() - room
            self._cond.wait_for(lambda: session.moving is None)  # making room released the lock: another
            if not session.is_paged:  # caller may have paged this session in meanwhile
                return None
            with self._moving(session, "in"):
                return self._page_in(session, total, called, room)

    def _page_in(self, session: SessionMemory, total: int, called: float, room: float) -> Transfer:
        sid = session.sid
        start = time.perf_counter()
        spilled = session.spilled
        if spilled is None:
            storages, sizes = [s for s, _ in session.paged], [e.nbytes for _, e in session.paged]
        else:
            storages, sizes = spilled[0], list(spilled[1].sizes)
        lane = "in" if spilled is None else "disk"
        grown: list[torch.UntypedStorage] = []
        try:
            for storage, size in zip(storages, sizes, strict=True):
                storage.resize_(size)
                grown.append(storage)
            if spilled is None:
                seconds = self._copy([(_bytes_view(s), e.view) for s, e in session.paged], lane)
            else:
                dsts = [_bytes_view(s) for s in storages]
                seconds = self._timed(lane, lambda copy: self._read_spilled(spilled[1], dsts, copy))
        except BaseException as exc:
            if lane in self._streams:
                self._streams[lane].synchronize()  # no copy queued before the error still touches what is freed
            for storage in grown:
                storage.resize_(0)
            if isinstance(exc, torch.OutOfMemoryError):
                raise OutOfMemoryError(
                    f"the device has no room to page session {sid} back in ({total / MiB:.1f} MiB); it stays "
                    f"paged: finish or close another session and retry"
                ) from exc
            raise
        if spilled is None:
            self._drop_paged(session)
        else:
            self.spill.remove(spilled[1])
            session.spilled = None
            self.unspills += 1
        end = time.perf_counter()
        transfer = Transfer(sid, "in", total, len(storages), seconds, end - start, end - called, room)
        self.transfers.append(transfer)
        self.page_ins += 1
        return transfer

    def _read_spilled(self, spilled: SpillFile, dsts: list[torch.Tensor], copy: Copy) -> None:
        """Read the file through the staging ring into the device storages ``dsts`` (in the file's order), queueing
        each block's copies as it lands; its staging block is reused once an event after them completed (on the
        CPU the copies are done when they return)."""
        stream = self._streams.get("disk")

        def landed(block: torch.Tensor, pieces: list[Piece]) -> Fence | None:
            at = 0
            for index, first, end in pieces:
                copy(dsts[index][first:end], block[at : at + end - first])
                at += end - first
            if stream is None:
                return None
            event = torch.cuda.Event()
            event.record(stream)
            return event.synchronize

        self.spill.read(spilled, self._staging, landed)

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], lane: str) -> float:
        """Copy ``src -> dst`` for each pair (see ``_timed``)."""

        def each(copy: Copy) -> None:
            for dst, src in pairs:
                copy(dst, src)

        return self._timed(lane, each)

    def _timed(self, lane: str, issue: Callable[[Copy], None]) -> float:
        """Run ``issue(copy)``, each ``copy(dst, src)`` queueing one copy (on CUDA on the lane's stream, after the
        compute stream's queued work), on the lane's worker thread with the lock released, and wait for the copies.
        Returns the seconds from the start of ``issue`` to the last copy done (CUDA events on the stream)."""
        stream = self._streams.get(lane)
        if stream is None:
            seconds: list[float] = []

            def run() -> None:
                start = time.perf_counter()
                issue(lambda dst, src: dst.copy_(src))
                seconds.append(time.perf_counter() - start)

            self._unlocked(lane, run)
            return seconds[0]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def queue_and_wait() -> None:
            with torch.cuda.stream(stream):
                begin.record(stream)
                issue(lambda dst, src: dst.copy_(src, non_blocking=True))
                done.record(stream)
            done.synchronize()

        self._unlocked(lane, queue_and_wait)
        return begin.elapsed_time(done) / 1000

    def _unlocked(self, lane: str, work: Callable[[], None]) -> None:
        """Run blocking ``work`` (a copy's event wait on CUDA, the copies themselves on the CPU, so that the CPU
        tests exercise this same path; a spill's file write) on the lane's worker thread while this thread waits
        on the lock's condition, which releases the lock at every level the caller holds."""
        worker = self._workers.get(lane)
        if worker is None:
            worker = self._workers[lane] = _Worker(self._cond, f"djinn-{lane}")
        job = worker.submit(work)
        try:
            self._cond.wait_for(job.done.is_set)
        except BaseException:
            self._cond.wait_for(job.done.is_set)  # interrupted: the bytes are still moving; never free under them
            raise
        if job.error is not None:
            raise job.error

    # phase signals (phases.py drives these) -------------------------------------------------------------
    def mark_io_wait(self, sid: int, expected_s: float | None) -> int:
        """The session waits on IO (a tool call) for about ``expected_s`` seconds (None: unknown); returns the
        epoch that the signalled page-out and prefetch must still find current to act."""
        with self._lock:
            session = self._live(sid)
            session.io_epoch += 1
            session.io_until = float("inf") if expected_s is None else time.monotonic() + expected_s
            return session.io_epoch

    def mark_compute(self, sid: int) -> None:
        """The session's IO wait is over (``compute``): pending signalled page-outs and prefetches do nothing."""
        with self._lock:
            _end_io_wait(self._live(sid))

    def page_out_signalled(self, sid: int, epoch: int) -> Transfer | None:
        """The page-out an ``io_wait`` asked for, if that wait is still current; off the caller's path."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.lost is not None or session.io_epoch != epoch or session.io_until is None:
                return None
            return self.page_out(sid)

    def prefetch(self, sid: int, epoch: int) -> Transfer | None:
        """Page a session in ahead of the end of its IO wait, if that wait is still current and room can be made
        without touching a session that runs or expects to run sooner: a prefetch never delays anyone else."""
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.lost is not None or session.io_epoch != epoch or not session.is_paged:
                return None
            need = session.paged_bytes()
            later = [s for s in self._sessions.values() if s.sid != sid and s.pageable and not s.is_paged
                     and s.io_until is not None and s.io_until > (session.io_until or 0.0)]
            for victim in sorted(later, key=lambda s: s.io_until or 0.0, reverse=True):
                if self.charged_total() + need <= self.budget:
                    break
                self.page_out(victim.sid)
            if self.charged_total() + need > self.budget:
                return None
            return self.page_in(sid)

    def bandwidth(self) -> float | None:
        """Bytes per second of the recent page-outs and page-ins (wall time), None before the first one."""
        with self._lock:
            moved = [t for t in self.transfers if t.wall_seconds > 0]
            if not moved:
                return None
            return sum(t.nbytes for t in moved) / sum(t.wall_seconds for t in moved)

    # status ---------------------------------------------------------------------------------------------
    def session_stats(self, sid: int) -> dict[str, object]:
        with self._lock:
            session = self.session(sid)
            return {
                "gpu_bytes": session.resident_bytes(),
                "host_bytes": session.host_bytes(),
                "disk_bytes": session.disk_bytes(),
                "paged": session.is_paged,
                "reserved": session.reserved,
                "lost": session.lost,
                "phase": "compute" if session.io_until is None else "io_wait",
            }

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "device": str(self.device),
                "budget": self.budget,
                "session_gpu_bytes": self.resident_total(),
                "charged_bytes": self.charged_total(),
                "host_pool": self.pool.stats(),
                "spill": None if self.spill is None else {**self.spill.stats(), "spills": self.spills,
                                                           "unspills": self.unspills},
                "policy": self.policy.name,
                "page_outs": self.page_outs,
                "page_ins": self.page_ins,
                "overcommits": self.overcommits,
                "growth_page_outs": self.growth_page_outs,
            }


def _end_io_wait(session: SessionMemory) -> None:
    if session.io_until is not None:
        session.io_until = None
        session.io_epoch += 1


class _Job:
    def __init__(self, work: Callable[[], None]) -> None:
        self.work = work
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Worker:
    """A daemon thread that runs blocking jobs in turn and, as each ends, sets its flag and notifies ``cond``:
    how the manager waits for copies without holding its lock."""

    def __init__(self, cond: threading.Condition, name: str) -> None:
        self._cond = cond
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, work: Callable[[], None]) -> _Job:
        job = _Job(work)
        self._queue.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job.work()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, who raises it
                job.error = exc
            with self._cond:
                job.done.set()
                self._cond.notify_all()
