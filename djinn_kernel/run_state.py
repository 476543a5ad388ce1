"""A run's life as one state machine: its states, the only moves between them, and what each state allows.

The engine moves a run (``Run.move``) when it processes the run's events and the user's commands; nothing else
assigns a run's state. The memory manager hears of every move (``MemoryManager.on_run``) and derives from the
state alone whether the session's device state may be paged, so that decision lives in one place.

    RUNNING ──pause──> PAUSED ──resume / step / finish / cancel──> RUNNING
    RUNNING ──> FINISHED | FAILED | CANCELLED  (ended: no move leaves them)
"""

from __future__ import annotations

import enum


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in ENDED

    @property
    def pageable(self) -> bool:
        """Whether the session's device state may be paged: not while a forward of the run may read or grow it."""
        return self is not RunState.RUNNING


ENDED = frozenset({RunState.FINISHED, RunState.FAILED, RunState.CANCELLED})

MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: frozenset({RunState.PAUSED, *ENDED}),
    RunState.PAUSED: frozenset({RunState.RUNNING}),
    **{state: frozenset() for state in ENDED},
}


class IllegalMove(RuntimeError):
    """A move the table does not allow: an engine bug, never a user error (those are refused before moving)."""


def check_move(state: RunState, to: RunState) -> None:
    if to not in MOVES[state]:
        raise IllegalMove(f"a run cannot move from {state.value} to {to.value}")
