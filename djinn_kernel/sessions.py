"""A session as the engine keeps it: its model, breakpoints and steering, its conversation, and its current run."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from .breakpoints import BreakpointTable
from . import context
from .executor import Run, Steering, Worker
from .memory import MemoryManager
from .recording import Recording
from .sae import SAE
from .registry import LoadedModel
from .run_state import ENDED


@dataclass
class SessionState:
    id: int
    owner: str
    model: LoadedModel
    memory: MemoryManager
    breakpoints: BreakpointTable = field(default_factory=BreakpointTable)
    steering: dict[int, Steering] = field(default_factory=dict)
    recordings: dict[int, Recording] = field(default_factory=dict)
    saes: dict[str, SAE] = field(default_factory=dict)  # by module path: sparse autoencoders attached (sae.py)
    run: Run | None = None
    history: list[int] = field(default_factory=list)  # the conversation's tokens; see context.py
    cache: object | None = None  # K/V of the history, kept across runs
    closed: bool = False
    stage: int | None = None  # its session on the stage that runs the rest of a split model's layers (split.py)
    lock: threading.RLock = field(default_factory=threading.RLock)
    worker: Worker = field(init=False)  # the session's executor thread
    _steer_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _record_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _run_ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.worker = Worker(f"djinn-session-{self.id}")

    def steering_at(self, path: str, side: str) -> list[Steering]:
        return [s for s in self.steering.values() if s.path == path and s.side == side]

    def gpu_tensors(self) -> list[torch.Tensor]:
        tensors = context.tensors(self.cache)
        return tensors + ([] if self.run is None else self.run.gpu_tensors())

    def state(self) -> str:
        if self.closed:
            return "closed"
        memory = self.memory.session(self.id)
        if memory.lost is not None:
            return "lost"
        if memory.is_paged:
            return "paged"
        if self.run is None or self.run.state in ENDED:
            return "idle"
        return self.run.state.value
