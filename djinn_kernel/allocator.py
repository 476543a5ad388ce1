"""The C allocator of a long-lived daemon: bound its arenas and hand freed memory back to the OS.

Why: glibc gives each thread that allocates while another holds an arena lock an arena of its own, up to 8 per
core, and frees into the arena a chunk came from. A daemon runs forwards on many threads (64 request workers,
one executor per session); a run's buffers (a 3,000-token prefill's attention scores are 137 MiB a layer) are
freed into whichever arenas they came from, and glibc returns only the free tail of each heap. Measured
(2026-12-02, 2 CPU cores, ``tests/test_faults.py``: 9 clients SIGKILLed per batch, paused, mid-prefill and
mid-decode): the daemon's RSS went 459 MiB -> 1,260 MiB over 5 batches with every session reclaimed and the same
Python objects (421k) and tensors (154) alive after each batch: no leak. ``malloc_trim(0)`` brought that 1,260
to 795 MiB; 2 arenas without a trim stayed at 724-867 MiB; both, 585-613 MiB over 34 batches (300 kills)
against 582 MiB before the first (the weights file's pages, read in by the first forward, included).

Both calls are glibc's; elsewhere (musl, macOS) they are skipped and the allocator keeps its own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
DAEMON_ARENAS = 2


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def bound_arenas(count: int = DAEMON_ARENAS) -> bool:
    """Cap glibc's arenas at ``count`` for threads that get one from now on; call it before starting threads.
    ``MALLOC_ARENA_MAX`` in the environment wins (an operator's choice). Returns whether the cap was set."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, count))


def trim() -> bool:
    """Return every free page of every arena to the OS (``malloc_trim(0)``); True if any was returned."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))
