"""The disk tier below the host pool: when the pool has no room, sessions already paged to the host are spilled
to files, least recently used first, and read back when they are paged in.

Invariants:
- One file per spilled session in the spill folder: the session's host extents back to back (the pinned pool is
  the only staging buffer). The file is moved in blocks of ``block_bytes``, ``threads`` blocks at a time
  (``pwritev``/``preadv`` release the GIL, and a disk serves several requests in flight faster than one), each
  block straight from or into the extents it covers.
- A read hands every block to the caller as it lands (``landed``, on the calling thread), so the caller can copy
  it on to the device while later blocks are still being read: a page-in from disk costs about the longer of
  the read and the copy, not their sum. When ``read`` returns, for good or with an error, no reader thread is
  still writing into the extents, so the caller may free them.
- A file is readable by the daemon's user only (0600): it holds a session's state.
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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidArgumentError, OutOfMemoryError, PagingError
from .runtime import pid_alive

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
IOV_MAX = 1024  # the most buffers one preadv/pwritev takes on Linux

Piece = tuple[int, int, int]  # (extent index, first byte, end byte) of one block's part inside one extent


@dataclass(frozen=True)
class SpillFile:
    path: Path
    sizes: tuple[int, ...]  # the extents it holds, in order

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


def blocks(sizes: tuple[int, ...], block_bytes: int) -> list[tuple[int, list[Piece]]]:
    """The file of extents ``sizes`` back to back cut into blocks of ``block_bytes`` (fewer where ``IOV_MAX`` small
    extents come first): (file offset, the extent pieces it covers)."""
    out: list[tuple[int, list[Piece]]] = []
    offset, pieces, room = 0, [], block_bytes
    for index, size in enumerate(sizes):
        first = 0
        while first < size:
            take = min(size - first, room)
            pieces.append((index, first, first + take))
            first, room = first + take, room - take
            if room == 0 or len(pieces) == IOV_MAX:
                out.append((offset, pieces))
                offset, pieces, room = offset + block_bytes - room, [], block_bytes
    if pieces:
        out.append((offset, pieces))
    return out


def _move(op: Callable[[int, list[memoryview], int], int], fd: int, buffers: list[memoryview], offset: int) -> int:
    """``os.preadv``/``os.pwritev`` until every buffer is done; the bytes moved (fewer only at the end of a file)."""
    buffers, done = [b for b in buffers if len(b)], 0
    while buffers:
        got = op(fd, buffers, offset + done)
        if got == 0:
            break
        done += got
        while buffers and got >= len(buffers[0]):
            got -= len(buffers.pop(0))
        if got:
            buffers[0] = buffers[0][got:]
    return done


class SpillStore:
    """Spill files under ``folder``, at most ``capacity`` bytes of them, moved ``threads`` blocks of
    ``block_bytes`` at a time."""

    def __init__(self, folder: str | Path, capacity: int, threads: int = 4, block_bytes: int = 16 * MiB) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidArgumentError(f"the disk tier needs at least one IO thread, not {threads!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < PAGE \
                or block_bytes % PAGE:
            raise InvalidArgumentError(
                f"the disk tier's block must be a positive multiple of {PAGE} bytes (a page), not {block_bytes!r}"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.threads = threads
        self.block_bytes = block_bytes
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
        buffers = [memoryview(v.numpy()) for v in views]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self._each_block(path, fd, os.pwritev, sizes, buffers, None)
            finally:
                os.close(fd)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise OutOfMemoryError(
                f"spilling session {sid} to {self.folder} failed ({why}); it stays in host memory: free disk "
                f"space or close sessions"
            ) from exc
        self.used += total
        self.files.add(path)
        return SpillFile(path, sizes)

    def read(
        self, spilled: SpillFile, views: list[torch.Tensor], landed: Callable[[list[Piece]], None] | None = None
    ) -> None:
        """Fill ``views`` (one per size, in order) from the file, calling ``landed(pieces)`` on this thread as each
        block is in, in the order blocks land; ``PagingError`` if the file cannot be read whole (an error of
        ``landed`` is raised as it is). Either way no reader is left running when it returns."""
        buffers = [memoryview(v.numpy()) for v in views]
        try:
            fd = os.open(spilled.path, os.O_RDONLY)
            try:
                self._each_block(spilled.path, fd, os.preadv, spilled.sizes, buffers, landed)
            finally:
                os.close(fd)
        except OSError as exc:
            raise PagingError(f"reading the spill file {spilled.path} failed ({exc.strerror or exc})") from exc

    def _each_block(
        self,
        path: Path,
        fd: int,
        op: Callable[[int, list[memoryview], int], int],
        sizes: tuple[int, ...],
        buffers: list[memoryview],
        landed: Callable[[list[Piece]], None] | None,
    ) -> None:
        """``op`` every block of the file, ``threads`` at a time; ``landed`` for each as it completes. On an error
        the blocks not started are cancelled and the running ones waited for before it is raised."""

        def one(offset: int, pieces: list[Piece]) -> None:
            want = sum(end - first for _, first, end in pieces)
            got = _move(op, fd, [buffers[i][first:end] for i, first, end in pieces], offset)
            if got != want:
                raise PagingError(f"the spill file {path} ends early ({want - got} bytes short at byte {offset + got})")

        with ThreadPoolExecutor(self.threads, thread_name_prefix="djinn-spill") as pool:
            futures: dict[Future[None], list[Piece]] = {
                pool.submit(one, offset, pieces): pieces for offset, pieces in blocks(sizes, self.block_bytes)
            }
            try:
                for future in as_completed(futures):
                    future.result()
                    if landed is not None:
                        landed(futures[future])
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

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
        return {"folder": str(self.folder), "capacity": self.capacity, "used": self.used, "files": len(self.files),
                "threads": self.threads, "block_bytes": self.block_bytes}
