"""Where a new session goes on a cluster of engines (one per GPU): pure bookkeeping, no Ray, no torch.

The policy (``place``), in order:
1. An engine where the session's model is resident and the KV memory left there holds one more session
   (``headroom >= need``): the one with the most headroom, so sessions spread over the GPUs that hold the model.
2. Otherwise (every such engine full, or the model resident nowhere): load the model on an engine where it is not
   resident and where its weights and one session fit: the one with the most headroom.
3. Otherwise the resident engine with the most headroom, oversubscribed: its memory manager pages idle and paused
   sessions to the host to make room, as a single engine does today.
4. Otherwise (the model resident nowhere and no engine with room for its weights) the engine with the most
   headroom is asked to load it, and reports its own error when it cannot.
Ties go to the engine with fewer sessions, then to the lower index. Dead engines never receive a session.

Rebalancing (``rebalance``): an engine is under pressure when its sessions hold more bytes in all (on the device,
paged to the host or spilled to disk: all of it comes back to the device to run) than its budget, so its memory
manager pages them in and out. Sessions that can move (idle or paused, no call in flight) go from the engine most
over its budget, largest first (fewest moves), to the engine with the most room left where they fit without
putting it over, until the engine is within its budget or nothing fits elsewhere.

Headroom counts every session at least ``need`` bytes (what one session is expected to take, e.g. its KV for a
full context), or at what it holds on the device if that is more: a session opened but not yet run still takes
its room, so a burst of new sessions spreads over the engines instead of piling onto one that looks empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineLoad:
    """What placement knows of one engine: its index, its budget (device bytes for sessions), the bytes each of
    its sessions holds on the device, and the models resident on it. ``weights_in_budget``: a model loaded there
    takes its weights out of the budget (a budget measured from free GPU memory), else the budget is the
    operator's, for sessions alone (``--gpu-memory``)."""

    index: int
    budget: int
    session_bytes: tuple[int, ...] = ()
    models: frozenset[str] = field(default_factory=frozenset)
    alive: bool = True
    weights_in_budget: bool = False

    def headroom(self, need: int) -> int:
        """Budget left once every session is counted at ``need`` bytes or at what it holds, if more."""
        return self.budget - sum(max(held, need) for held in self.session_bytes)


@dataclass(frozen=True)
class Placement:
    """The engine a session goes to; ``load``: its model must be loaded there first; ``rule``: which of the
    policy's rules chose it (1-4, see the module docstring)."""

    engine: int
    load: bool
    rule: int


class NoEngineError(Exception):
    """Every engine is dead: nothing can take a session (the backend turns this into a user-facing error)."""


def place(model: str, engines: Sequence[EngineLoad], need: int, weight_bytes: int = 0) -> Placement:
    """The engine for a new session of ``model`` (see the module docstring). ``need``: the bytes one session is
    expected to take; ``weight_bytes``: the model's weights, taken out of an engine's budget when it loads them."""
    live = [e for e in engines if e.alive]
    if not live:
        raise NoEngineError("no engine is alive")
    resident = [e for e in live if model in e.models]
    others = [e for e in live if model not in e.models]

    def best(candidates: list[EngineLoad]) -> EngineLoad:
        return min(candidates, key=lambda e: (-e.headroom(need), len(e.session_bytes), e.index))

    roomy = [e for e in resident if e.headroom(need) >= need]
    if roomy:
        return Placement(best(roomy).index, load=False, rule=1)
    loadable = [e for e in others if e.headroom(need) >= need + (weight_bytes if e.weights_in_budget else 0)]
    if loadable:
        return Placement(best(loadable).index, load=True, rule=2)
    if resident:
        return Placement(best(resident).index, load=False, rule=3)
    return Placement(best(others).index, load=True, rule=4)


@dataclass(frozen=True)
class SessionLoad:
    """What rebalancing knows of one session: its engine, the bytes it holds in all, whether it can move now."""

    sid: int
    engine: int
    held: int
    movable: bool


def rebalance(engines: Sequence[EngineLoad], sessions: Sequence[SessionLoad]) -> list[tuple[int, int]]:
    """The moves, (session, target engine) in order, that relieve engines under pressure (module docstring).
    ``engines``' budgets are the yardstick; their loads are recounted from ``sessions``' ``held`` bytes."""
    live = {e.index: e for e in engines if e.alive}
    held = {index: 0 for index in live}
    for s in sessions:
        if s.engine in held:
            held[s.engine] += s.held
    moves: list[tuple[int, int]] = []
    for source in sorted(live, key=lambda i: live[i].budget - held[i]):
        if held[source] <= live[source].budget:
            break  # the rest are within their budgets
        for s in sorted((s for s in sessions if s.engine == source and s.movable), key=lambda s: (-s.held, s.sid)):
            if held[source] <= live[source].budget:
                break
            room = {i: live[i].budget - held[i] for i in live if i != source}
            fits = [i for i, left in room.items() if left >= s.held]
            if not fits:
                continue
            target = min(fits, key=lambda i: (-room[i], i))
            moves.append((s.sid, target))
            held[source] -= s.held
            held[target] += s.held
    return moves


def split_pair(engines: Sequence[EngineLoad], need: int) -> tuple[int, int]:
    """The engines for a model split in two by layer: the host (sessions, the later layers) and the stage (the
    first layers): the two live engines with the most headroom, the host first. ``NoEngineError`` with fewer."""
    live = sorted((e for e in engines if e.alive), key=lambda e: (-e.headroom(need), len(e.session_bytes), e.index))
    if len(live) < 2:
        raise NoEngineError(f"a split needs two live engines; {len(live)} {'is' if len(live) == 1 else 'are'} alive")
    return live[0].index, live[1].index
