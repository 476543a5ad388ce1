"""What a widget was given (a ``Pause``, a ``Run``, or ``_djinn`` from the magics, which is one of the two) turned
into the handle it needs, so magics and widgets share one object model."""

from __future__ import annotations

from typing import Any

from djinn_kernel.api import Pause, Run
from djinn_kernel.errors import NotPausedError


def as_run(target: Any) -> Run:
    """The run of a ``Pause``, or the ``Run`` itself."""
    if isinstance(target, Pause):
        return target.run
    if isinstance(target, Run):
        return target
    raise TypeError(f"expected a djinn Pause or Run (e.g. _djinn after %djinn run), not {type(target).__name__}")


def as_pause(target: Any) -> Pause:
    """A ``Pause``, or a paused ``Run``'s current pause."""
    if isinstance(target, Pause):
        return target
    run = as_run(target)
    if run.pause is None:
        raise NotPausedError(f"run {run.id} is {run.state}, not paused: start one that pauses (%djinn run PROMPT)")
    return run.pause
