"""Breakpoint specifications and the pure bookkeeping that decides whether a hook firing should pause.

A breakpoint names a module path and a side (``output``: after the module ran, the value it returns;
``input``: before it runs, its first positional argument). It hits every time that module runs, in prefill
(token step 0) and in every decode step, unless limited by ``tokens`` (token steps to stop at) or ``max_hits``
(stop at most this many times; ``once`` is ``max_hits=1``). This module holds no threads and no tensors, so the
rules are tested without a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InvalidArgumentError

SIDES = ("output", "input")


def parse_tokens(tokens: int | range | tuple[int, int] | str | None) -> range | None:
    """Normalise a token-step limit: ``5``, ``range(2, 6)``, ``(2, 5)`` or ``"2-5"`` (both ends inclusive)."""
    if tokens is None:
        return None
    if isinstance(tokens, range):
        if tokens.step != 1:
            raise InvalidArgumentError(f"tokens must be consecutive steps; {tokens!r} skips some (use its first and last)")
        result = tokens
    elif isinstance(tokens, bool):
        raise InvalidArgumentError(f"tokens must be an int, a range, (first, last) or 'first-last', not {tokens!r}")
    elif isinstance(tokens, int):
        result = range(tokens, tokens + 1)
    elif isinstance(tokens, str):
        first, sep, last = tokens.partition("-")
        if not _is_number(first) or (sep and not _is_number(last)):
            raise InvalidArgumentError(f"tokens {tokens!r} is not 'N' or 'FIRST-LAST' (e.g. '0-4')")
        result = range(int(first), int(last if sep else first) + 1)
    elif isinstance(tokens, (tuple, list)) and len(tokens) == 2 and all(type(t) is int for t in tokens):
        result = range(tokens[0], tokens[1] + 1)
    else:
        raise InvalidArgumentError(f"tokens must be an int, a range, (first, last) or 'first-last', not {tokens!r}")
    if len(result) == 0 or result.start < 0:
        raise InvalidArgumentError(f"token range {tokens!r} is empty or negative; token steps start at 0 (prefill)")
    return result


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts superscripts like "²", which ``int`` then refuses."""
    text = text.strip()
    return text.isascii() and text.isdigit()


def remove_by_id(items: dict[int, object], item_id: int | None, what: str) -> list[int]:
    """Delete ``items[item_id]``, or every item when ``item_id`` is None; returns the ids removed."""
    if item_id is None:
        removed = list(items)
        items.clear()
        return removed
    if type(item_id) is not int or item_id not in items:  # an id off the wire may be any JSON value, even a dict
        raise InvalidArgumentError(f"no {what} {item_id!r:.40}; existing: {sorted(items) or 'none'}")
    del items[item_id]
    return [item_id]


@dataclass
class Breakpoint:
    """One breakpoint of a session. ``hits`` counts the pauses it caused, across runs of the session."""

    id: int
    path: str
    layer: int | None
    side: str = "output"
    tokens: range | None = None
    max_hits: int | None = None
    enabled: bool = True
    hits: int = 0
    condition: object | None = None  # a conditions.Condition; this module stays free of tensors

    def wants(self, path: str, side: str, token_step: int) -> bool:
        if not self.enabled or path != self.path or side != self.side:
            return False
        if self.tokens is not None and token_step not in self.tokens:
            return False
        return self.max_hits is None or self.hits < self.max_hits

    def may_hit(self, token_step: int) -> bool:
        """Whether it could fire somewhere in forward number ``token_step`` (without counting a hit)."""
        return (
            self.enabled
            and (self.tokens is None or token_step in self.tokens)
            and (self.max_hits is None or self.hits < self.max_hits)
        )

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "path": self.path,
            "layer": self.layer,
            "side": self.side,
            "tokens": None if self.tokens is None else [self.tokens.start, self.tokens.stop - 1],
            "max_hits": self.max_hits,
            "hits": self.hits,
            "enabled": self.enabled,
            "when": getattr(self.condition, "text", None),
        }


@dataclass
class BreakpointTable:
    """A session's breakpoints. ``match`` returns the ones that fire and counts the hit."""

    _items: dict[int, Breakpoint] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add(
        self,
        path: str,
        layer: int | None,
        side: str = "output",
        tokens: int | range | tuple[int, int] | str | None = None,
        max_hits: int | None = None,
        condition: object | None = None,
    ) -> Breakpoint:
        if side not in SIDES:
            raise InvalidArgumentError(f"side must be one of {SIDES}, not {side!r}")
        if max_hits is not None and (isinstance(max_hits, bool) or not isinstance(max_hits, int) or max_hits < 1):
            raise InvalidArgumentError(f"max_hits must be a positive integer, not {max_hits!r}")
        bp = Breakpoint(next(self._ids), path, layer, side, parse_tokens(tokens), max_hits, condition=condition)
        self._items[bp.id] = bp
        return bp

    def remove(self, bp_id: int | None = None) -> list[int]:
        """Delete one breakpoint by id, or all of them when ``bp_id`` is None; returns the ids removed."""
        return remove_by_id(self._items, bp_id, "breakpoint")

    def match(
        self, path: str, side: str, token_step: int, holds: Callable[[Breakpoint], bool] | None = None
    ) -> list[Breakpoint]:
        """The breakpoints that fire here; a conditional one only where ``holds`` says its condition does."""
        hit = [
            bp
            for bp in self._items.values()
            if bp.wants(path, side, token_step) and (bp.condition is None or (holds is not None and holds(bp)))
        ]
        for bp in hit:
            bp.hits += 1
        return hit

    def may_hit(self, token_step: int) -> bool:
        """Whether any breakpoint could fire somewhere in forward number ``token_step`` (hits are not counted)."""
        return any(bp.may_hit(token_step) for bp in self._items.values())

    def __iter__(self):
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)
