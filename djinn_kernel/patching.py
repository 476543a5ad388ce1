"""Activation patching: put a clean run's activations into a corrupted run, one layer and position at a time,
and measure how much of the clean answer each patch brings back (the causal-tracing figure).

Built only on the public API (``Session.record``, ``Session.steer_with``), so it runs the same in-process and
through the daemon. Each patched run is a one-token generation of the corrupted prompt whose session steers
with a ``SetPromptRows`` of the clean row at that layer and position: no pause, so on a fast-path engine the
run stays in the batch, and the sweep keeps several sessions generating at once for the scheduler to pack their
prefills together. Nothing else differs from the corrupted run, so patching a run with its own recording
changes nothing, bit for bit (a test), and the grid equals patching each run at a pause (``Pause.patch``).
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .edits import SetPromptRows
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .api import Model, Session

Metric = Callable[[torch.Tensor], float]


@dataclass(frozen=True)
class PatchGrid:
    """The metric of the corrupted run with one activation patched from the clean run: ``values[i, j]`` for
    layer ``layers[i]`` at prompt position ``positions[j]``; ``clean`` and ``corrupted`` are the unpatched runs'."""

    values: torch.Tensor
    layers: list[int]
    positions: list[int]
    tokens: list[str]  # the corrupted prompt's tokens at ``positions``, for labels
    clean: float
    corrupted: float

    def recovered(self) -> torch.Tensor:
        """Each patch's share of the way from the corrupted metric to the clean one (1 = fully restored)."""
        span = self.clean - self.corrupted
        if span == 0:
            raise InvalidArgumentError("the clean and corrupted runs score the same: nothing to recover")
        return (self.values - self.corrupted) / span


def logit_difference(good: int, bad: int) -> Metric:
    """The next-token logit of ``good`` minus that of ``bad`` (e.g. the right answer and the corrupted one)."""
    return lambda logits: float(logits[good] - logits[bad])


def patch_sweep(
    model: Model,
    clean: list[int],
    corrupted: list[int],
    metric: Metric,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    concurrent: int = 16,
) -> PatchGrid:
    """Patch each (layer, position) of ``clean`` into ``corrupted`` (token ids of equal length) and score the
    next-token logits with ``metric``. ``layers``/``positions``: all by default. The sweep is
    ``len(layers) * len(positions)`` one-token runs, ``concurrent`` of them at once (one session each);
    ``metric`` and ``on_progress(done, total)`` are called on the caller's thread, the latter after each run."""
    if not isinstance(clean, list) or not isinstance(corrupted, list):
        raise InvalidArgumentError("clean and corrupted are lists of token ids (tokenize text first)")
    if len(clean) != len(corrupted) or not clean:
        raise InvalidArgumentError(
            f"clean and corrupted prompts must have the same number of tokens to patch position by position, "
            f"not {len(clean)} and {len(corrupted)}"
        )
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise InvalidArgumentError(f"concurrent must be a positive integer, not {concurrent!r}")
    count = model.num_layers  # a negative layer counts from the end, as everywhere; its rows are kept by index
    layers = list(range(count)) if layers is None else [i + count if type(i) is int and i < 0 else i for i in layers]
    positions = list(range(len(clean))) if positions is None else [p % len(clean) for p in positions]
    with model.session() as source:
        source.record(layers)
        clean_run = source.generate(clean, 1, keep_logits=True)
        recorded = clean_run.recorded
        clean_score = metric(clean_run.logits[0])
    cells = [(i, j) for i in range(len(layers)) for j in range(len(positions))]
    values = torch.empty(len(layers), len(positions))
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(model.session()) for _ in range(min(concurrent, len(cells)))]
        corrupted_score = metric(sessions[0].generate(corrupted, 1, keep_logits=True).logits[0])
        idle: queue.SimpleQueue[Session] = queue.SimpleQueue()
        for session in sessions:
            idle.put(session)

        def patched(layer: int, position: int) -> torch.Tensor:
            """The corrupted run's next-token logits with the clean row at (layer, position), on an idle session."""
            session = idle.get()
            try:
                steer = session.steer_with(layer, SetPromptRows((position,), recorded[layer][[position]]))
                try:
                    return session.generate(corrupted, 1, keep_logits=True).logits[0]
                finally:
                    session.unsteer(steer)
            finally:
                idle.put(session)

        pool = ThreadPoolExecutor(len(sessions), thread_name_prefix="djinn-patch")
        stack.callback(pool.shutdown, cancel_futures=True)  # also on an error or Ctrl-C: no further run starts
        futures = {pool.submit(patched, layers[i], positions[j]): (i, j) for i, j in cells}
        for done, future in enumerate(as_completed(futures), 1):
            values[futures[future]] = metric(future.result())
            if on_progress is not None:
                on_progress(done, len(cells))
    labels = model.token_strings([corrupted[p] for p in positions])
    return PatchGrid(values, layers, positions, labels, clean_score, corrupted_score)
