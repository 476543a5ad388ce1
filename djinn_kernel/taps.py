"""Taps: decoder-layer outputs that the runner's layer loop hands to host memory, for recordings on the fast path.

A recording must not cost the fast path its speed: no Python hook per layer, no host sync per layer, and on CUDA
nothing that a captured graph cannot replay. So the layer loop only gives each tapped layer's rows a fixed
device address (the decode step's staging buffer, which the captured graph writes; in the eager prefill, the
layer's output itself), and an ``Outbox`` copies them to their host rows afterwards.

Invariants:
- The copies run on the outbox's side stream, after an event recorded on the stream that computed the rows; the
  compute stream waits for them (on the device) only before it writes a staging buffer they read again, and the
  host never does during a step. A tap's ``done`` is the event after which its host rows hold the values; a
  host reader waits on it (``Recorder.result``), never on the whole device.
- A source stays valid until its copy is done: a freshly computed tensor is marked as used by the side stream
  (``record_stream``), so the allocator does not reuse it earlier; a staging buffer is written again only after
  the compute stream waited for the event of the copies that read it (``_CudaSteps``).
- On the CPU a copy is done when ``send`` returns (``done`` stays ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tap:
    """One row's output of one decoder layer in one forward, bound for ``dest`` (host, ``[kept, hidden]``): the
    row's tokens at ``keep`` (indices from 0 among the tokens this forward feeds the row; all when ``None``)."""

    dest: torch.Tensor
    keep: list[int] | None = None
    done: torch.cuda.Event | None = None


class Outbox:
    """Copies tapped rows from the device to their host rows on one side stream (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream: torch.cuda.Stream | None = None  # made on first use: no CUDA work at construction

    def send(self, pairs: list[tuple[torch.Tensor, Tap]]) -> torch.cuda.Event | None:
        """Queue ``tap.dest.copy_(source)`` for each pair; the event after which all of them are done (CUDA)."""
        if not pairs:
            return None
        if self._device.type != "cuda":
            for source, tap in pairs:
                tap.dest.copy_(source)
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self._device))
        done = torch.cuda.Event()
        with torch.cuda.stream(stream):
            for source, tap in pairs:
                tap.dest.copy_(source, non_blocking=True)
                source.record_stream(stream)
            done.record(stream)
        for _, tap in pairs:
            tap.done = done
        return done
