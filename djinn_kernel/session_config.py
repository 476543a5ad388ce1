"""A session's configuration as a value: its breakpoints (with their hit counts), steering, recordings and attached
SAEs, taken at a moment and put back later.

What a migrated paused run needs (migration.py): the configuration it began with, and the configuration each time
the user changed it during a pause (a breakpoint added, steering removed...), so that its replay elsewhere passes
each pause with the configuration that was in effect there. A snapshot copies what can change in place (a
breakpoint's hit count) and shares what cannot (steering edits, SAEs), until ``moved`` copies those to a device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch

from .breakpoints import Breakpoint, BreakpointTable


@dataclass(frozen=True)
class Config:
    breakpoints: tuple[Breakpoint, ...]
    next_breakpoint: int
    steering: tuple[Any, ...]  # executor.Steering
    recordings: tuple[Any, ...]  # recording.Recording
    saes: dict[str, Any]  # module path -> sae.SAE

    def moved(self, device: torch.device | str) -> Config:
        """The same configuration with its tensors (steering edits, SAEs) copied to ``device``."""
        steering = tuple(replace(s, edit=edit_to(s.edit, device)) for s in self.steering)
        return replace(self, steering=steering, saes={path: sae.to(torch.device(device)) for path, sae in self.saes.items()})


def edit_to(edit: Any, device: torch.device | str) -> Any:
    return replace(edit, **{name: t.detach().to(device, copy=True) for name, t in edit.tensors().items()})


def next_id(counter_holder: object, name: str) -> int:
    """The id ``holder.name`` (an ``itertools.count``) gives next, leaving the counter where it was."""
    value = next(getattr(counter_holder, name))
    setattr(counter_holder, name, itertools.count(value))
    return value


def ids(session: Any) -> tuple:
    """Which breakpoints, steering, recordings and SAEs the session has (ids are never reused): equal ids, equal
    configuration, but for hit counts."""
    return (
        tuple(bp.id for bp in session.breakpoints),
        tuple(session.steering),
        tuple(session.recordings),
        tuple((path, id(sae)) for path, sae in session.saes.items()),
    )


def snapshot(session: Any) -> Config:
    return Config(
        tuple(replace(bp) for bp in session.breakpoints),
        next_id(session.breakpoints, "_ids"),
        tuple(session.steering.values()),
        tuple(session.recordings.values()),
        dict(session.saes),
    )


def install(session: Any, config: Config) -> None:
    """Give ``session`` this configuration (its tensors already on the session's device), and its modules the
    routing hooks the configuration needs (as adding each would have)."""
    session.breakpoints = BreakpointTable({bp.id: replace(bp) for bp in config.breakpoints},
                                          itertools.count(config.next_breakpoint))
    session.steering = {s.id: s for s in config.steering}
    session.recordings = {r.id: r for r in config.recordings}
    session.saes = dict(config.saes)
    hooked = [*(bp.path for bp in config.breakpoints), *(s.path for s in config.steering),
              *(r.path for r in config.recordings), *config.saes]
    for path in dict.fromkeys(hooked):
        session.model.dispatcher.ensure(path)
