"""Recording: the activations of chosen modules at every step of a session's runs, kept without pausing.

Invariants:
- A recording belongs to the session (``session.record``) and applies to each later run until it is removed,
  like persistent steering. Each run gets its own ``Recorder``, whose rows live in one host-pool extent per
  recording (pinned on CUDA), sized on the first activation for the whole run (prompt rows plus one row per
  decode step): the host budget is checked once, before anything is copied, and a recording that does not fit
  fails the run with ``OutOfMemoryError`` saying so.
- On the module path, rows are copied device-to-host asynchronously from the hooks, on the stream that computed
  them, so a recording adds no host sync per layer; the rows are read only after the run has ended and its
  stream is synchronised.
- On the fast path (every recording of the run at a decoder layer's output, see ``scheduler.fast_plan``) no
  hook runs: each forward asks for ``taps``, host rows the runner fills from its layer loop on a side stream
  (taps.py), and the rows count once the forward has succeeded (``written``), so a failed or cancelled forward
  leaves no row unfilled (the pool's memory is reused: an unfilled row would show another session's bytes).
  ``result`` and ``free`` wait for the copies still in flight into these rows (their events), not for the whole
  device, whether or not their forward succeeded.
- Rows line up with ``run.prompt_ids + run.tokens``: the prefill's positions (all, or the ``positions`` chosen),
  then one row per decode step, for the token that step fed (the last generated token is fed by no forward, so
  it has no row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .edits import check_positions
from .errors import InvalidArgumentError, OutOfMemoryError
from .host_pool import Extent, HostPool, MiB
from .taps import Tap


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
        self._layers = {r.layer: r.path for r in recordings if r.layer is not None}
        self._pool = pool
        self._prompt = prompt_tokens
        self._max_new = max_new_tokens
        self._extents: dict[str, Extent] = {}
        self._rows: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}
        self._device: torch.device | None = None
        self._in_flight: list[Tap] = []  # the fast path's taps whose copies may not have landed yet

    @property
    def recordings(self) -> list[Recording]:
        return list(self._recordings.values())

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
        keep = self._kept(recording, step, rows.shape[0])
        if keep is not None:
            rows = rows[keep]
        self._next_rows(recording, rows.shape[0], rows.dtype, rows.shape[-1]).copy_(rows, non_blocking=True)
        self._filled[path] += rows.shape[0]
        self._device = rows.device

    def taps(self, step: int, tokens: int, dtype: torch.dtype, width: int) -> dict[int, Tap]:
        """Where the fast path's forward number ``step``, feeding ``tokens`` tokens, sends each recording's rows,
        by decoder layer (``fast_plan`` keeps a run with any other recording on the module path). They count once
        ``written``."""
        # The run's forwards come one after another: a tap not sent by now never will be.
        self._in_flight = [t for t in self._in_flight if t.done is not None and not t.done.query()]
        out = {}
        for recording in self._recordings.values():
            keep = self._kept(recording, step, tokens)
            rows = self._next_rows(recording, tokens if keep is None else len(keep), dtype, width)
            out[recording.layer] = Tap(rows, keep)
        self._in_flight.extend(out.values())
        return out

    def written(self, taps: dict[int, Tap]) -> None:
        """The forward that ``taps`` came from succeeded: their rows count (host-readable after ``tap.done``)."""
        for layer, tap in taps.items():
            self._filled[self._layers[layer]] += tap.dest.shape[0]

    @staticmethod
    def _kept(recording: Recording, step: int, tokens: int) -> list[int] | None:
        """The indices among a forward's ``tokens`` that the recording keeps (``None``: all of them)."""
        if step == 0 and recording.positions is not None:
            return check_positions(recording.positions, tokens, "the prompt's")
        return None

    def _next_rows(self, recording: Recording, count: int, dtype: torch.dtype, width: int) -> torch.Tensor:
        """The host rows after those filled so far, ``[count, width]``; the run's rows allocated on first use."""
        path = recording.path
        if path not in self._rows:
            self._allocate(recording, dtype, width)
        start = self._filled[path]
        dest = self._rows[path]
        if start + count > dest.shape[0]:
            raise InvalidArgumentError(f"{path} gave more rows than the run has steps")
        return dest[start : start + count]

    def _allocate(self, recording: Recording, dtype: torch.dtype, width: int) -> None:
        prompt = self._prompt if recording.positions is None else len(recording.positions)
        count = prompt + self._max_new - 1
        nbytes = count * width * dtype.itemsize
        try:
            extent = self._pool.alloc(nbytes)
        except OutOfMemoryError as exc:
            raise OutOfMemoryError(
                f"recording {recording.path} needs {nbytes / MiB:.1f} MiB of host memory for this run and the host "
                f"pool cannot give it ({exc}); record fewer layers or positions, or generate fewer tokens"
            ) from exc
        self._extents[recording.path] = extent
        self._rows[recording.path] = extent.view.view(dtype).view(count, width)
        self._filled[recording.path] = 0

    def result(self) -> dict[str, torch.Tensor]:
        """CPU copies of every recording's rows so far (call after the run ended: it waits for the copies)."""
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self._wait_for_copies()
        return {path: rows[: self._filled[path]].clone() for path, rows in self._rows.items()}

    def _wait_for_copies(self) -> None:
        for tap in self._in_flight:
            if tap.done is not None:
                tap.done.synchronize()
        self._in_flight.clear()

    def free(self) -> None:
        """Give the rows' host memory back (the session's next run or its close), once no copy writes it."""
        self._wait_for_copies()
        for extent in self._extents.values():
            self._pool.free(extent)
        self._extents.clear()
        self._rows.clear()
