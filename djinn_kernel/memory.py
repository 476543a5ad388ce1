"""The memory manager: every GPU byte a session holds, a VRAM budget, and a host pool to page into.

Invariants:
- Paging is storage-level. A session's tensors (KV cache, the paused activation) are copied storage by
  storage, each into its own contiguous host extent, then each storage is ``resize_(0)``-ed. Every view of it (the
  paused forward's local variables included) stays valid and sees the same bytes after ``resize_`` back and
  the copy home. Nothing is lost: the host extent is freed only after the copy back has completed.
- Only a session whose executor is blocked (paused) or has no run may be paged; a running forward is never
  touched. The engine reports these transitions (``set_pageable``), and holds the session's memory lock
  around edits, so a page-out never races a driver writing the same activation.
- Stream order on CUDA: a page-out's copy stream first waits for the compute stream (the bytes are final),
  and the storage is freed only once the copy's event has completed. A page-in allocates, waits for the
  compute stream, copies, and makes the compute stream wait on its event, so the resumed forward reads only
  complete data; the host extent is released after that event.
- The host pool is pinned in large chunks, up front or when it grows, never per copy (pinning costs ~0.6 s
  per GiB). When even the pool is full, the request that needs room gets ``OutOfMemoryError`` and every
  session keeps what it had.
- Policies only choose; the manager does the moving. ``PagingPolicy`` decides what to page on a pause and
  which sessions to evict under pressure, so new policies plug in without touching the mechanism.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import InvalidArgumentError, OutOfMemoryError, SessionClosedError

MiB = 1 << 20
GiB = 1 << 30


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


@dataclass
class Extent:
    chunk: int
    offset: int
    nbytes: int
    view: torch.Tensor  # uint8 [nbytes], inside the chunk


class HostPool:
    """Pinned (on CUDA machines) host memory in large chunks, handed out as first-fit contiguous extents."""

    def __init__(self, capacity: int, chunk_bytes: int = GiB, pin: bool = False, reserve: int = 0) -> None:
        if chunk_bytes <= 0:
            raise InvalidArgumentError("chunk_bytes must be positive")
        self.capacity = capacity
        self.chunk_bytes = chunk_bytes
        self.pin = pin
        self._chunks: list[torch.Tensor] = []
        self._free: list[list[tuple[int, int]]] = []  # per chunk, sorted (offset, size) holes
        self._lock = threading.Lock()
        self.used = 0
        self.reserve(reserve)

    def reserve(self, nbytes: int) -> None:
        """Allocate (and pin) chunks now, until ``nbytes`` are reserved, so no page-out pays for pinning."""
        with self._lock:
            while self.reserved < min(nbytes, self.capacity):
                self._grow(min(self.chunk_bytes, self.capacity - self.reserved))

    @property
    def reserved(self) -> int:
        return sum(c.numel() for c in self._chunks)

    def _grow(self, nbytes: int) -> int:
        self._chunks.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin))
        self._free.append([(0, nbytes)])
        return len(self._chunks) - 1

    def alloc(self, nbytes: int) -> Extent:
        """A contiguous extent of ``nbytes``; grows by a chunk if no hole fits, within ``capacity``."""
        nbytes = max(nbytes, 1)
        with self._lock:
            for index, holes in enumerate(self._free):
                for h, (offset, size) in enumerate(holes):
                    if size >= nbytes:
                        holes[h] = (offset + nbytes, size - nbytes)
                        if holes[h][1] == 0:
                            del holes[h]
                        return self._extent(index, offset, nbytes)
            # Whole chunks, a power of two when larger: torch's pinned allocator rounds up to one anyway.
            grow = self.chunk_bytes if nbytes <= self.chunk_bytes else 1 << (nbytes - 1).bit_length()
            if self.reserved + grow > self.capacity:
                grow = max(self.capacity - self.reserved, nbytes)
            if self.reserved + grow > self.capacity:
                raise OutOfMemoryError(
                    f"the host pool is full ({self.used / GiB:.2f} of {self.capacity / GiB:.2f} GiB used) and cannot "
                    f"take {nbytes / MiB:.1f} MiB more; close or finish other sessions, or start the daemon with a "
                    f"larger --host-memory"
                )
            index = self._grow(grow)
            holes = self._free[index]
            holes[0] = (nbytes, grow - nbytes)
            if holes[0][1] == 0:
                holes.clear()
            return self._extent(index, 0, nbytes)

    def _extent(self, chunk: int, offset: int, nbytes: int) -> Extent:
        self.used += nbytes
        return Extent(chunk, offset, nbytes, self._chunks[chunk][offset : offset + nbytes])

    def free(self, extent: Extent) -> None:
        with self._lock:
            holes = self._free[extent.chunk]
            holes.append((extent.offset, extent.nbytes))
            holes.sort()
            merged: list[tuple[int, int]] = []
            for offset, size in holes:
                if merged and merged[-1][0] + merged[-1][1] == offset:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((offset, size))
            self._free[extent.chunk] = merged
            self.used -= extent.nbytes

    def stats(self) -> dict[str, int | bool]:
        return {"capacity": self.capacity, "reserved": self.reserved, "used": self.used, "pinned": self.pin}


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
    sid: int
    tensors: Callable[[], list[torch.Tensor]]
    pageable: bool = False
    last_used: float = field(default_factory=time.monotonic)
    paged: list[tuple[torch.UntypedStorage, Extent]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def is_paged(self) -> bool:
        return bool(self.paged)

    def resident_bytes(self) -> int:
        return sum(s.nbytes() for s in unique_storages(self.tensors()))

    def host_bytes(self) -> int:
        return sum(extent.nbytes for _, extent in self.paged)


@dataclass(frozen=True)
class Transfer:
    """What one page-out or page-in moved: ``seconds`` is the copies alone (CUDA events on the copy stream,
    after it waited for compute); ``wall_seconds`` adds bookkeeping, allocation and the wait for compute."""

    sid: int
    direction: str
    nbytes: int
    copies: int
    seconds: float
    wall_seconds: float


class PagingPolicy(Protocol):
    def page_on_pause(self, session: SessionMemory) -> bool: ...

    def victims(self, sessions: list[SessionMemory], exclude: int | None) -> list[SessionMemory]: ...


class LRUPolicy:
    """Page out only under pressure, least recently used first; ``eager`` also pages every pause at once."""

    def __init__(self, eager: bool = False) -> None:
        self.eager = eager

    def page_on_pause(self, session: SessionMemory) -> bool:
        return self.eager

    def victims(self, sessions: list[SessionMemory], exclude: int | None) -> list[SessionMemory]:
        candidates = [s for s in sessions if s.sid != exclude and s.pageable and not s.is_paged]
        return sorted(candidates, key=lambda s: s.last_used)


class MemoryManager:
    """Accounts session bytes on the device against ``budget`` and pages sessions to the host pool and back."""

    def __init__(
        self,
        device: torch.device,
        budget: int,
        host_capacity: int,
        policy: PagingPolicy | None = None,
        chunk_bytes: int = GiB,
        host_reserve: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.budget = budget
        self.policy = policy or LRUPolicy()
        self.pool = HostPool(host_capacity, chunk_bytes, pin=self.device.type == "cuda", reserve=host_reserve)
        self._sessions: dict[int, SessionMemory] = {}
        self._lock = threading.RLock()
        self.transfers: deque[Transfer] = deque(maxlen=1024)
        self.page_outs = 0
        self.page_ins = 0
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._out_stream = torch.cuda.Stream(self.device)
            self._in_stream = torch.cuda.Stream(self.device)

    # registration and state ------------------------------------------------------------------------------
    def register(self, sid: int, tensors: Callable[[], list[torch.Tensor]]) -> SessionMemory:
        with self._lock:
            self._sessions[sid] = SessionMemory(sid, tensors)
            return self._sessions[sid]

    def release(self, sid: int) -> None:
        """Forget a session: its host extent goes back to the pool (its device tensors die with it)."""
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is not None:
            with session.lock:
                for _, extent in session.paged:
                    self.pool.free(extent)
                session.paged = []

    def session(self, sid: int) -> SessionMemory:
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise SessionClosedError(f"session {sid} was closed; its memory is released")
        return session

    def set_pageable(self, sid: int, pageable: bool) -> None:
        session = self.session(sid)
        session.pageable = pageable
        session.last_used = time.monotonic()
        if pageable and self.policy.page_on_pause(session):
            self.page_out(sid)

    def resident_total(self) -> int:
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.resident_bytes() for s in sessions)

    # pressure -------------------------------------------------------------------------------------------
    def make_room(self, need: int, for_sid: int | None = None) -> None:
        """Page out sessions the policy picks until ``need`` more bytes fit in the budget."""
        with self._lock:
            if self.resident_total() + need <= self.budget:
                return
            for victim in self.policy.victims(list(self._sessions.values()), for_sid):
                self.page_out(victim.sid)
                if self.resident_total() + need <= self.budget:
                    return
            used = self.resident_total()
        raise OutOfMemoryError(
            f"the GPU budget of {self.budget / MiB:.1f} MiB cannot hold {need / MiB:.1f} MiB more "
            f"({used / MiB:.1f} MiB held by sessions that cannot be paged now); finish or close a session, "
            f"or start the daemon with a larger --gpu-memory"
        )

    def on_growth(self, sid: int) -> None:
        """Called by a running session between forwards: keep the total within budget by paging others."""
        with self._lock:
            over = self.resident_total() - self.budget
        if over > 0:
            mine = self.session(sid).resident_bytes()
            self.make_room(0 if mine <= self.budget else mine, for_sid=sid)

    # moving ---------------------------------------------------------------------------------------------
    def page_out(self, sid: int) -> Transfer | None:
        session = self.session(sid)
        with session.lock:
            if session.is_paged or not session.pageable:
                return None
            storages = unique_storages(session.tensors())
            total = sum(s.nbytes() for s in storages)
            if total == 0:
                return None
            start = time.perf_counter()
            plan: list[tuple[torch.UntypedStorage, Extent]] = []
            try:
                for storage in storages:
                    plan.append((storage, self.pool.alloc(storage.nbytes())))
            except OutOfMemoryError:
                for _, extent in plan:
                    self.pool.free(extent)
                raise
            seconds = self._copy([(e.view, _bytes_view(s)) for s, e in plan], self._out_stream if self._cuda else None)
            for storage, _ in plan:
                storage.resize_(0)
            session.paged = plan
            transfer = Transfer(sid, "out", total, len(plan), seconds, time.perf_counter() - start)
            self.transfers.append(transfer)
            self.page_outs += 1
            return transfer

    def page_in(self, sid: int) -> Transfer | None:
        """Bring a paged session back (making room first); the compute stream is ordered after the copies."""
        session = self.session(sid)
        with session.lock:
            if not session.is_paged:
                session.last_used = time.monotonic()
                return None
            total = session.host_bytes()
            self.make_room(total, for_sid=sid)
            start = time.perf_counter()
            for storage, extent in session.paged:
                storage.resize_(extent.nbytes)
            copies = [(_bytes_view(s), e.view) for s, e in session.paged]
            seconds = self._copy(copies, self._in_stream if self._cuda else None)
            for _, extent in session.paged:
                self.pool.free(extent)
            transfer = Transfer(sid, "in", total, len(copies), seconds, time.perf_counter() - start)
            session.paged = []
            session.last_used = time.monotonic()
            self.transfers.append(transfer)
            self.page_ins += 1
            return transfer

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], stream: torch.cuda.Stream | None) -> float:
        """Copy ``src -> dst`` for each pair; on CUDA on ``stream``, ordered after compute and before it.

        Returns the seconds the copies themselves took.
        """
        if stream is None:
            start = time.perf_counter()
            for dst, src in pairs:
                dst.copy_(src)
            return time.perf_counter() - start
        compute = torch.cuda.current_stream(self.device)
        stream.wait_stream(compute)
        begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            begin.record(stream)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done.record(stream)
        compute.wait_event(done)
        done.synchronize()
        return begin.elapsed_time(done) / 1000

    # status ---------------------------------------------------------------------------------------------
    def session_stats(self, sid: int) -> dict[str, object]:
        session = self.session(sid)
        with session.lock:
            return {
                "gpu_bytes": session.resident_bytes(),
                "host_bytes": session.host_bytes(),
                "paged": session.is_paged,
            }

    def stats(self) -> dict[str, object]:
        return {
            "device": str(self.device),
            "budget": self.budget,
            "session_gpu_bytes": self.resident_total(),
            "host_pool": self.pool.stats(),
            "page_outs": self.page_outs,
            "page_ins": self.page_ins,
        }
