"""Phase signals: an agent says it now waits on a tool (``io_wait``) or computes again (``compute``).

While an agent waits on a tool its KV is dead weight on the device, and the agent knows it before any LRU
heuristic could. ``io_wait`` asks the policy (policies.py) whether to page the session out; if so the page-out
happens on this module's worker thread, so the caller returns at once. With a hint (``expected_s``) the worker
also pages the session back in shortly before the wait should end (a timer). ``compute`` (or any run) ends the
wait: a page-out or prefetch still queued then does nothing, and ``compute`` brings the KV back at once.

Invariants:
- The worker never decides whether a signal is still current: the memory manager checks the wait's epoch under
  its lock (``page_out_signalled``, ``prefetch``), so a late action can never page out a session that runs or
  that already computes again. Paging itself is the manager's (all-or-nothing, exact), so nothing is lost when a
  run starts meanwhile: the run's admission pages the session back in, bit for bit.
- Lock order: a session's lock → ``PhaseSignals._cond`` → the memory manager's lock. The worker holds ``_cond``
  only to take the next due action, never while it pages.
- The worker is a daemon thread started on the first signal (nothing starts at import or engine creation).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time

from .errors import InvalidArgumentError, OutOfMemoryError
from .memory import MemoryManager, Transfer

# Swap rate assumed before the manager has measured one (bytes/s): pinned PCIe Gen5 copies ~50 GB/s measured,
# halved for bookkeeping and contention; host RAM copies on a CPU-only machine.
PRIOR_BANDWIDTH = {"cuda": 25e9, "cpu": 2e9}
PREFETCH_MARGIN_S = 0.005  # the prefetch starts this much before the estimated page-in would have to


def check_expected(expected_s: object) -> float | None:
    """``expected_s`` as seconds, or None; an ``InvalidArgumentError`` that says what is accepted otherwise."""
    if expected_s is None:
        return None
    if isinstance(expected_s, bool) or not isinstance(expected_s, (int, float)) or not 0 <= expected_s < math.inf:
        raise InvalidArgumentError(
            f"expected_s must be None or a finite number of seconds >= 0 (the tool call's expected duration), "
            f"not {expected_s!r}"
        )
    return float(expected_s)


class PhaseSignals:
    """Turns ``io_wait``/``compute`` into policy decisions and background page-outs and prefetches."""

    def __init__(self, memory: MemoryManager) -> None:
        self.memory = memory
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, str, int, int]] = []  # (when, order, "out"/"in", sid, epoch)
        self._order = itertools.count()
        self._busy = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = {"io_waits": 0, "signalled_page_outs": 0, "prefetches": 0, "kept": 0, "failed": 0}
        self.last_error: str | None = None

    # signals ----------------------------------------------------------------------------------------------
    def io_wait(self, sid: int, expected_s: float | None) -> dict[str, object]:
        """Mark the wait, ask the policy, queue the page-out (and the prefetch) if it says so; never blocks on a copy."""
        expected_s = check_expected(expected_s)
        epoch = self.memory.mark_io_wait(sid, expected_s)
        session = self.memory.session(sid)
        stats = self.memory.session_stats(sid)
        nbytes = int(stats["gpu_bytes"]) or int(stats["host_bytes"])
        one_way = nbytes / self.bandwidth()
        swap_s = 2 * one_way
        page, reason = self.memory.policy.page_on_io_wait(session, expected_s, swap_s)
        now = time.monotonic()
        with self._cond:
            self.counts["io_waits"] += 1
            if not page:
                self.counts["kept"] += 1
            if page and nbytes:
                self._queue(now, "out", sid, epoch)
                if expected_s is not None and self.memory.policy.prefetch(session):
                    self._queue(now + max(expected_s - 1.5 * one_way - PREFETCH_MARGIN_S, 0.0), "in", sid, epoch)
        return {"paging": bool(page and nbytes), "reason": reason, "expected_s": expected_s,
                "estimated_swap_s": swap_s, "bytes": nbytes, "policy": self.memory.policy.name}

    def compute(self, sid: int) -> Transfer | None:
        """End the wait and bring the KV back now (on the caller's path: it is about to run). When the device has
        no room for it now, it stays paged and the next run's admission brings it back (or queues that run)."""
        self.memory.mark_compute(sid)
        try:
            return self.memory.page_in(sid)
        except OutOfMemoryError:
            return None

    def bandwidth(self) -> float:
        """Bytes/s for swap estimates: the policy's own figure, else the measured rate, else a prior."""
        fixed = getattr(self.memory.policy, "bandwidth", None)
        if fixed:
            return float(fixed)
        return self.memory.bandwidth() or PRIOR_BANDWIDTH.get(self.memory.device.type, PRIOR_BANDWIDTH["cpu"])

    # worker -----------------------------------------------------------------------------------------------
    def _queue(self, when: float, kind: str, sid: int, epoch: int) -> None:
        heapq.heappush(self._due, (when, next(self._order), kind, sid, epoch))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="djinn-phase-signals", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _next(self) -> tuple[str, int, int] | None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._due and self._due[0][0] <= now:
                    _, _, kind, sid, epoch = heapq.heappop(self._due)
                    self._busy += 1
                    return kind, sid, epoch
                self._cond.wait(None if not self._due else self._due[0][0] - now)  # the prefetch timer
            return None

    def _loop(self) -> None:
        while (action := self._next()) is not None:
            kind, sid, epoch = action
            try:
                if kind == "out":
                    moved = self.memory.page_out_signalled(sid, epoch)
                else:
                    moved = self.memory.prefetch(sid, epoch)
                key = "signalled_page_outs" if kind == "out" else "prefetches"
            except Exception as exc:  # noqa: BLE001 - a failed page-out leaves the session resident and exact
                moved, key = None, "failed"
                self.last_error = f"{kind} of session {sid}: {type(exc).__name__}: {exc}"
            with self._cond:
                if moved is not None or key == "failed":
                    self.counts[key] += 1
                self._busy -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued action (timers included) has been carried out; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._due and self._busy == 0, timeout)

    def stats(self) -> dict[str, object]:
        with self._cond:
            return {**self.counts, "queued": len(self._due), "last_error": self.last_error}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._due.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
