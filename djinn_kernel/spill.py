"""The disk tier below the host pool: when the pool has no room, sessions already paged to the host are spilled
to files, least recently used first, and read back when they are paged in.

Invariants:
- One file per spilled session in the spill folder, written sequentially from the session's host extents (the
  pinned pool is the only staging buffer) and read back into fresh extents in large blocks.
- All or nothing. A failed write (a full disk, the folder's ``capacity``) removes the partial file, and the
  session keeps its host extents; a failed read leaves the session on disk as it was. Nothing is lost.
- A file lives exactly as long as its session stays spilled: it is removed once read back, when the session is
  closed (or reclaimed when its client dies), and when the store is closed. Files that a killed daemon left
  behind (their name carries its pid) are removed when the next store opens the folder.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OutOfMemoryError, PagingError
from .runtime import pid_alive

GiB = 1 << 30


@dataclass(frozen=True)
class SpillFile:
    path: Path
    sizes: tuple[int, ...]  # the extents it holds, in order

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


class SpillStore:
    """Spill files under ``folder``, at most ``capacity`` bytes of them."""

    def __init__(self, folder: str | Path, capacity: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.used = 0
        self.files: set[Path] = set()
        self._names = itertools.count(1)
        self._prefix = f"djinn-{os.getpid()}-"
        for stale in self.folder.glob("djinn-*-*.spill"):
            pid = stale.name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)

    def write(self, sid: int, views: list[torch.Tensor]) -> SpillFile:
        """One file holding ``views`` (host uint8 tensors) back to back; ``OutOfMemoryError`` if it cannot."""
        sizes = tuple(int(v.numel()) for v in views)
        total = sum(sizes)
        if self.used + total > self.capacity:
            raise OutOfMemoryError(
                f"the spill folder {self.folder} is full ({self.used / GiB:.2f} of {self.capacity / GiB:.2f} GiB "
                f"used) and cannot take {total / GiB:.2f} GiB more; close sessions, or start the daemon with a larger "
                f"--spill-memory"
            )
        path = self.folder / f"{self._prefix}s{sid}-{next(self._names)}.spill"
        try:
            with open(path, "wb", buffering=0) as f:
                for view in views:
                    f.write(memoryview(view.numpy()))
        except OSError as exc:
            path.unlink(missing_ok=True)
            why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise OutOfMemoryError(
                f"spilling session {sid} to {self.folder} failed ({why}); it stays in host memory: free disk "
                f"space or close sessions"
            ) from exc
        self.used += total
        self.files.add(path)
        return SpillFile(path, sizes)

    def read(self, spilled: SpillFile, views: list[torch.Tensor]) -> None:
        """Fill ``views`` (one per size, in order) from the file; ``PagingError`` if it cannot be read whole."""
        try:
            with open(spilled.path, "rb", buffering=0) as f:
                for view, size in zip(views, spilled.sizes, strict=True):
                    buffer, done = memoryview(view.numpy()), 0
                    while done < size:
                        got = f.readinto(buffer[done:])
                        if not got:
                            raise PagingError(f"the spill file {spilled.path} ends early ({done} of {size} bytes)")
                        done += got
        except OSError as exc:
            raise PagingError(f"reading the spill file {spilled.path} failed ({exc.strerror or exc})") from exc

    def remove(self, spilled: SpillFile) -> None:
        spilled.path.unlink(missing_ok=True)
        if spilled.path in self.files:
            self.files.discard(spilled.path)
            self.used -= spilled.nbytes

    def close(self) -> None:
        for path in list(self.files):
            path.unlink(missing_ok=True)
        self.files.clear()
        self.used = 0

    def stats(self) -> dict[str, object]:
        return {"folder": str(self.folder), "capacity": self.capacity, "used": self.used, "files": len(self.files)}
