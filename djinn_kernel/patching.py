"""Activation patching: put a clean run's activations into a corrupted run, one layer and position at a time,
and measure how much of the clean answer each patch brings back (the causal-tracing figure).

Built only on the public API (``Session.record``, breakpoints, ``Pause.patch``), so it runs the same in-process
and through the daemon. Each patched run is a one-token generation that pauses at the layer's output at the
prefill, takes the clean row at that position, and finishes; nothing else differs from the corrupted run, so
patching a run with its own recording changes nothing, bit for bit (a test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .api import Model

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
) -> PatchGrid:
    """Patch each (layer, position) of ``clean`` into ``corrupted`` (token ids of equal length) and score the
    next-token logits with ``metric``. ``layers``/``positions``: all by default; ``on_progress(done, total)``
    after each patched run (the sweep is ``len(layers) * len(positions)`` one-token runs)."""
    if not isinstance(clean, list) or not isinstance(corrupted, list):
        raise InvalidArgumentError("clean and corrupted are lists of token ids (tokenize text first)")
    if len(clean) != len(corrupted) or not clean:
        raise InvalidArgumentError(
            f"clean and corrupted prompts must have the same number of tokens to patch position by position, "
            f"not {len(clean)} and {len(corrupted)}"
        )
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    positions = list(range(len(clean))) if positions is None else [p % len(clean) for p in positions]
    with model.session() as source, model.session() as target:
        source.record(layers)
        clean_run = source.generate(clean, 1, keep_logits=True)
        clean_run.recorded  # noqa: B018 - fetched now, while it is the source session's run
        clean_score = metric(clean_run.logits[0])
        corrupted_score = metric(target.generate(corrupted, 1, keep_logits=True).logits[0])
        values = torch.empty(len(layers), len(positions))
        total = values.numel()
        for i, layer in enumerate(layers):
            bp = target.break_at(layer, tokens=0)
            for j, position in enumerate(positions):
                run = target.generate(corrupted, 1, keep_logits=True)
                run.pause.patch(clean_run, [position])
                values[i, j] = metric(run.finish().logits[0])
                if on_progress is not None:
                    on_progress(i * len(positions) + j + 1, total)
            target.delete(bp)
    labels = model.token_strings([corrupted[p] for p in positions])
    return PatchGrid(values, layers, positions, labels, clean_score, corrupted_score)
