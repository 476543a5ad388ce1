"""Paging policies by name: what ``djinn serve --policy NAME`` and ``Engine(policy=NAME)`` choose between.

A policy only decides (memory.py's ``PagingPolicy``); the memory manager moves the bytes. The four differ in what
they do when an agent says it waits on a tool (``session.io_wait``) and when the budget runs out:

| name | on ``io_wait`` | under pressure |
|---|---|---|
| ``hold`` | keep | never page: a run that does not fit is refused (``OutOfMemoryError``), so callers queue |
| ``lru`` (default) | keep (signals ignored) | page idle or paused sessions, least recently used first |
| ``signal`` | page out now, prefetch before the hinted end | sessions in an IO wait first (longest left), then LRU |
| ``signal-keep-short`` | as ``signal``, but keep it when the hinted wait < ``factor`` × the swap round trip | as ``signal`` |

Why keep-short: a swap costs a page-out and a page-in (bytes / measured bandwidth each way); a wait shorter than
twice that round trip gains little room for long and risks the agent waiting on its own page-in.
"""

from __future__ import annotations

from .errors import InvalidArgumentError
from .memory import LRUPolicy, PagingPolicy, SessionMemory


class HoldPolicy:
    """Never swap: what a serving engine without swap does. Every session keeps its KV on the device."""

    name = "hold"

    def page_on_pause(self, session: SessionMemory) -> bool:
        return False

    def victims(self, sessions: list[SessionMemory], exclude: int | None) -> list[SessionMemory]:
        return []

    def page_on_io_wait(self, session: SessionMemory, expected_s: float | None, swap_s: float) -> tuple[bool, str]:
        return False, "the hold policy never swaps"

    def prefetch(self, session: SessionMemory) -> bool:
        return False


class SignalPolicy(LRUPolicy):
    """Swap on the agent's own signal: page out at ``io_wait``, page back in just before the hinted end."""

    name = "signal"

    def page_on_io_wait(self, session: SessionMemory, expected_s: float | None, swap_s: float) -> tuple[bool, str]:
        return True, "io_wait: paged out off the caller's path"

    def prefetch(self, session: SessionMemory) -> bool:
        return True

    def victims(self, sessions: list[SessionMemory], exclude: int | None) -> list[SessionMemory]:
        """Sessions waiting on IO first, the one expected back last first; then the LRU order of the rest."""
        lru = super().victims(sessions, exclude)
        waiting = sorted((s for s in lru if s.io_until is not None), key=lambda s: s.io_until or 0.0, reverse=True)
        return waiting + [s for s in lru if s.io_until is None]


class KeepShortPolicy(SignalPolicy):
    """``signal``, except that a wait hinted shorter than ``factor`` × the estimated swap round trip keeps the KV.

    ``bandwidth`` (bytes/s) fixes the estimate's rate; by default the manager's measured rate is used."""

    name = "signal-keep-short"

    def __init__(self, factor: float = 2.0, bandwidth: float | None = None) -> None:
        super().__init__()
        if not factor > 0 or (bandwidth is not None and not bandwidth > 0):
            raise InvalidArgumentError("factor and bandwidth must be positive numbers")
        self.factor = factor
        self.bandwidth = bandwidth

    def page_on_io_wait(self, session: SessionMemory, expected_s: float | None, swap_s: float) -> tuple[bool, str]:
        if expected_s is None:
            return True, "io_wait without a hint: treated as long, paged out"
        threshold = self.factor * swap_s
        if expected_s > threshold:
            return True, f"expected wait {expected_s:.3g} s > {self.factor:g} x swap {swap_s:.3g} s: paged out"
        return False, f"expected wait {expected_s:.3g} s <= {self.factor:g} x swap {swap_s:.3g} s: kept resident"


POLICIES: dict[str, type] = {
    "hold": HoldPolicy,
    "lru": LRUPolicy,
    "signal": SignalPolicy,
    "signal-keep-short": KeepShortPolicy,
}


def make_policy(policy: str | PagingPolicy) -> PagingPolicy:
    """A policy by name (``POLICIES``), or the given policy object unchanged."""
    if not isinstance(policy, str):
        if not all(hasattr(policy, m) for m in ("page_on_pause", "victims", "page_on_io_wait", "prefetch")):
            raise InvalidArgumentError(f"{policy!r} is not a paging policy; pass one of {', '.join(POLICIES)}")
        return policy
    if policy not in POLICIES:
        raise InvalidArgumentError(f"unknown paging policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[policy]()
