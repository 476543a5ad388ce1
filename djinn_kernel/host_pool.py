"""The host pool: pinned host memory in large chunks, handed out as contiguous extents for paged session storages
and recordings. The memory manager (memory.py) decides what moves; this only keeps the bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError, OutOfMemoryError

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Extent:
    chunk: int
    offset: int
    nbytes: int
    view: torch.Tensor  # uint8 [nbytes], inside the chunk


class HostPool:
    """Pinned (on CUDA machines) host memory in large chunks, handed out as first-fit contiguous extents.

    Pinning is slow (0.6-1.4 s per GiB measured) and, worse, holds the CUDA driver: on the H200 a chunk pinned
    on a background thread stalled a concurrent page-out's copies for the whole 2 s it took. So the pool pins
    ``reserve`` bytes when it is made, before any session runs, and grows only when a page-out finds no room
    (``grown_on_swap_path`` counts those chunks: a sign the reserve is too small).
    """

    def __init__(self, capacity: int, chunk_bytes: int = GiB, pin: bool = False, reserve: int = 0) -> None:
        if chunk_bytes <= 0:
            raise InvalidArgumentError("chunk_bytes must be positive")
        self.capacity = capacity
        self.chunk_bytes = chunk_bytes
        self.pin = pin
        self._chunks: list[torch.Tensor] = []
        self._free: list[list[tuple[int, int]]] = []  # per chunk, sorted (offset, size) holes
        self._lock = threading.Lock()
        self.used = 0
        self.grown_on_swap_path = 0
        self.reserve(reserve)

    def reserve(self, nbytes: int) -> None:
        """Allocate (and pin) chunks now, until ``nbytes`` are reserved, so no page-out pays for pinning."""
        with self._lock:
            while self.reserved < min(nbytes, self.capacity):
                self._grow(min(self.chunk_bytes, self.capacity - self.reserved))

    @property
    def reserved(self) -> int:
        return sum(c.numel() for c in self._chunks)

    def _grow(self, nbytes: int) -> int:
        self._chunks.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin))
        self._free.append([(0, nbytes)])
        return len(self._chunks) - 1

    def alloc(self, nbytes: int) -> Extent:
        """A contiguous extent of ``nbytes``; grows by a chunk if no hole fits, within ``capacity``."""
        nbytes = max(nbytes, 1)
        with self._lock:
            for index, holes in enumerate(self._free):
                for h, (offset, size) in enumerate(holes):
                    if size >= nbytes:
                        holes[h] = (offset + nbytes, size - nbytes)
                        if holes[h][1] == 0:
                            del holes[h]
                        return self._extent(index, offset, nbytes)
            # Whole chunks, a power of two when larger: torch's pinned allocator rounds up to one anyway.
            grow = self.chunk_bytes if nbytes <= self.chunk_bytes else 1 << (nbytes - 1).bit_length()
            if self.reserved + grow > self.capacity:
                grow = max(self.capacity - self.reserved, nbytes)
            if self.reserved + grow > self.capacity:
                raise OutOfMemoryError(
                    f"the host pool is full ({self.used / GiB:.2f} of {self.capacity / GiB:.2f} GiB used) and cannot "
                    f"take {nbytes / MiB:.1f} MiB more; close or finish other sessions, or start the daemon with a "
                    f"larger --host-memory"
                )
            index = self._grow(grow)
            self.grown_on_swap_path += 1
            holes = self._free[index]
            holes[0] = (nbytes, grow - nbytes)
            if holes[0][1] == 0:
                holes.clear()
            return self._extent(index, 0, nbytes)

    def _extent(self, chunk: int, offset: int, nbytes: int) -> Extent:
        self.used += nbytes
        return Extent(chunk, offset, nbytes, self._chunks[chunk][offset : offset + nbytes])

    def free(self, extent: Extent) -> None:
        with self._lock:
            holes = self._free[extent.chunk]
            holes.append((extent.offset, extent.nbytes))
            holes.sort()
            merged: list[tuple[int, int]] = []
            for offset, size in holes:
                if merged and merged[-1][0] + merged[-1][1] == offset:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((offset, size))
            self._free[extent.chunk] = merged
            self.used -= extent.nbytes

    def stats(self) -> dict[str, int | bool]:
        return {"capacity": self.capacity, "reserved": self.reserved, "used": self.used, "pinned": self.pin,
                "grown_on_swap_path": self.grown_on_swap_path}
