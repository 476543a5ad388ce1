"""The named handshake between a session's executor thread (running the forward) and whoever drives the run.

Invariants:
- Exactly one side acts at a time. The executor posts an ``Event`` and, for ``PAUSED``, blocks until the driver
  sends a ``Command``. While the executor is blocked, the driver may read and edit the paused value: nothing else
  touches it.
- Events and commands carry increasing sequence numbers. A driver waits for "an event newer than the one I
  saw", never for "is there a paused value?", so it cannot mistake the previous pause for a new one after a
  resume.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass


class Event(enum.Enum):
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Command(enum.Enum):
    CONTINUE = "continue"  # run to the next breakpoint hit
    STEP = "step"  # run to the next decoder layer's output
    FINISH = "finish"  # run to the end, ignoring breakpoints (persistent steering still applies)
    ABORT = "abort"  # unwind the forward; the run ends as cancelled


@dataclass(frozen=True)
class Posted:
    seq: int
    event: Event
    payload: object = None


class Handoff:
    """A one-slot, two-direction rendezvous with sequence numbers; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._posted = Posted(0, Event.FINISHED)
        self._command: Command | None = None
        self._command_seq = 0

    @property
    def seq(self) -> int:
        with self._cond:
            return self._posted.seq

    # executor side
    def post(self, event: Event, payload: object = None) -> None:
        with self._cond:
            self._posted = Posted(self._posted.seq + 1, event, payload)
            self._cond.notify_all()

    def pause(self, payload: object) -> Command:
        """Post ``PAUSED`` and block the calling (executor) thread until the driver answers."""
        with self._cond:
            seen = self._command_seq
            self._posted = Posted(self._posted.seq + 1, Event.PAUSED, payload)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._command_seq > seen)
            assert self._command is not None
            return self._command

    # driver side
    def wait(self, after: int, timeout: float | None = None) -> Posted | None:
        """The first event posted after sequence number ``after``; ``None`` on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._posted.seq > after, timeout):
                return None
            return self._posted

    def send(self, command: Command) -> None:
        with self._cond:
            self._command = command
            self._command_seq += 1
            self._cond.notify_all()
