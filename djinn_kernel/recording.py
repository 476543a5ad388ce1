"""Recording: the activations of chosen modules at every step of a session's runs, kept without pausing.

Invariants:
- A recording belongs to the session (``session.record``) and applies to each later run until it is removed,
  like persistent steering. Each run gets its own ``Recorder``, whose rows live in one host-pool extent per
  recording (pinned on CUDA), sized on the first activation for the whole run (prompt rows plus one row per
  decode step): the host budget is checked once, before anything is copied, and a recording that does not fit
  fails the run with ``OutOfMemoryError`` saying so.
- Rows are copied device-to-host asynchronously on the stream that computed them, so a recording adds no host
  sync per layer; the rows are read only after the run has ended and its stream is synchronised.
- Rows line up with ``run.prompt_ids + run.tokens``: the prefill's positions (all, or the ``positions`` chosen),
  then one row per decode step, for the token that step fed (the last generated token is fed by no forward, so
  it has no row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .edits import check_positions
from .errors import InvalidArgumentError, OutOfMemoryError
from .memory import Extent, HostPool, MiB


@dataclass(frozen=True)
class Recording:
    id: int
    path: str
    layer: int | None
    positions: tuple[int, ...] | None  # prompt positions kept at the prefill (None: all)

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "path": self.path, "layer": self.layer,
                "positions": None if self.positions is None else list(self.positions)}


class Recorder:
    """One run's recorded rows, for each of the session's recordings (see the module docstring)."""

    def __init__(self, recordings: list[Recording], pool: HostPool, prompt_tokens: int, max_new_tokens: int) -> None:
        self._recordings = {r.path: r for r in recordings}
        self._pool = pool
        self._prompt = prompt_tokens
        self._max_new = max_new_tokens
        self._extents: dict[str, Extent] = {}
        self._rows: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}
        self._device: torch.device | None = None

    def wants(self, path: str) -> bool:
        return path in self._recordings

    def take(self, path: str, step: int, value: torch.Tensor) -> None:
        """Queue the copy of this step's rows of ``value`` (``[batch 1, tokens, width]``) to the host."""
        recording = self._recordings[path]
        rows = value.detach()
        if rows.dim() != 3 or rows.shape[0] != 1:
            raise InvalidArgumentError(
                f"{path} gives {tuple(rows.shape)} activations; recording keeps [1, tokens, width] ones (a decoder "
                f"layer or a module on the residual stream)"
            )
        rows = rows[0]
        if step == 0 and recording.positions is not None:
            rows = rows[check_positions(recording.positions, rows.shape[0], "the prompt's")]
        if path not in self._rows:
            self._allocate(recording, rows)
        start = self._filled[path]
        dest = self._rows[path]
        if start + rows.shape[0] > dest.shape[0]:
            raise InvalidArgumentError(f"{path} gave more rows than the run has steps")
        dest[start : start + rows.shape[0]].copy_(rows, non_blocking=True)
        self._filled[path] = start + rows.shape[0]
        self._device = rows.device

    def _allocate(self, recording: Recording, rows: torch.Tensor) -> None:
        prompt = self._prompt if recording.positions is None else len(recording.positions)
        count = prompt + self._max_new - 1
        nbytes = count * rows.shape[-1] * rows.element_size()
        try:
            extent = self._pool.alloc(nbytes)
        except OutOfMemoryError as exc:
            raise OutOfMemoryError(
                f"recording {recording.path} needs {nbytes / MiB:.1f} MiB of host memory for this run and the host "
                f"pool cannot give it ({exc}); record fewer layers or positions, or generate fewer tokens"
            ) from exc
        self._extents[recording.path] = extent
        self._rows[recording.path] = extent.view.view(rows.dtype).view(count, rows.shape[-1])
        self._filled[recording.path] = 0

    def result(self) -> dict[str, torch.Tensor]:
        """CPU copies of every recording's rows so far (call after the run ended: it waits for the copies)."""
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return {path: rows[: self._filled[path]].clone() for path, rows in self._rows.items()}

    def free(self) -> None:
        """Give the rows' host memory back (the session's next run or its close)."""
        for extent in self._extents.values():
            self._pool.free(extent)
        self._extents.clear()
        self._rows.clear()
