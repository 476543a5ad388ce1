"""The disk tier below the host pool: when the pool has no room, sessions already paged to the host are spilled
to files, least recently used first, and read back when they are paged in.

Invariants:
- One file per spilled session in the spill folder: the session's host extents back to back. The file is moved in
  blocks of ``block_bytes``, ``threads`` blocks at a time (``pwritev``/``preadv`` release the GIL, and a disk serves
  several requests in flight faster than one). A write goes straight from the extents each block covers.
- A read goes through the caller's staging ring (``staging``: ``2 * threads`` blocks, pinned by the memory manager
  once), not through host extents, so bringing a session back from disk needs no room in the host pool and never
  spills another session on its way. Each block is handed to the caller as it lands (``landed``, on the calling
  thread), who queues its copy on to the device and answers with a fence; the block's buffer is read into again
  only after that fence returned (the copy out of it is done), oldest first. So a page-in from disk costs about
  the longer of the read and the copy, not their sum. When ``read`` returns, for good or with an error, no reader
  thread is still writing into the ring; copies handed on may still run, and the caller waits for them before
  it reads into the ring again (the manager reads one file at a time, on its disk worker).
- A file is readable by the daemon's user only (0600): it holds a session's state.
- All or nothing. A failed write (a full disk, the folder's ``capacity``) removes the partial file, and the
  session keeps its host extents; a failed read leaves the session on disk as it was. Nothing is lost.
- A write runs without the memory manager's lock, while other threads remove files: ``used`` and ``files`` are
  kept under the store's own lock, and a write reserves its bytes against ``capacity`` before it starts.
- A file lives exactly as long as its session stays spilled: it is removed once read back, when the session is
  closed (or reclaimed when its client dies), and when the store is closed. Its bytes leave ``used`` at once, but
  the unlink itself runs on the store's reaper thread: unlinking a 1.7 GB file took 0.39 s on a VM disk, time a
  resume from disk must not wait for. Freeing a file's blocks also slows a read running meanwhile (on the H200
  machine a 1.68 GB read ran at 63% of its speed beside one such unlink), so the reaper frees them
  ``REAP_STEP`` bytes at a time (truncating the file from its end), each step only while no read is under way,
  and unlinks the file once it is empty: a read that starts meanwhile shares the disk with one step at most.
  ``settle`` waits for pending unlinks (``close`` does). Files that a killed daemon left behind (their name
  carries its pid) are removed when the next store opens the folder.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidArgumentError, OutOfMemoryError, PagingError
from .runtime import pid_alive

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
IOV_MAX = 1024  # the most buffers one preadv/pwritev takes on Linux
REAP_STEP = 64 * MiB  # bytes of a removed file the reaper frees at a time (see the module docstring)

Piece = tuple[int, int, int]  # (extent index, first byte, end byte) of one block's part inside one extent
Fence = Callable[[], None]  # returns once the copies out of a landed block are done
Landed = Callable[[torch.Tensor, list[Piece]], Fence | None]  # (the block's bytes, what they hold) -> its fence


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
        self._lock = threading.Lock()  # ``used`` and ``files``: a write runs off the memory manager's lock
        self._unlinked = threading.Condition(self._lock)  # ``_doomed`` went down
        self._doomed = 0  # files removed from ``files`` whose unlink has not yet run
        self._reading = 0  # reads under way: the reaper waits for none, so an unlink never slows a resume's read
        self._reaper: queue.SimpleQueue[Path] | None = None
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
        with self._lock:
            if self.used + total > self.capacity:
                raise OutOfMemoryError(
                    f"the spill folder {self.folder} is full ({self.used / GiB:.2f} of {self.capacity / GiB:.2f} GiB "
                    f"used) and cannot take {total / GiB:.2f} GiB more; close sessions, or start the daemon with a "
                    f"larger --spill-memory"
                )
            self.used += total
        path = self.folder / f"{self._prefix}s{sid}-{next(self._names)}.spill"
        buffers = [memoryview(v.numpy()) for v in views]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self._write_blocks(path, fd, sizes, buffers)
            finally:
                os.close(fd)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            with self._lock:
                self.used -= total
            if not isinstance(exc, OSError):
                raise
            why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise OutOfMemoryError(
                f"spilling session {sid} to {self.folder} failed ({why}); it stays in host memory: free disk "
                f"space or close sessions"
            ) from exc
        with self._lock:
            self.files.add(path)
        return SpillFile(path, sizes)

    def staging(self, pin: bool) -> list[torch.Tensor]:
        """A ring of ``2 * threads`` buffers of ``block_bytes`` in one allocation (pinned if ``pin``, once, when the
        memory manager is made) for ``read``: ``threads`` blocks being read while as many wait for their copies."""
        count = 2 * self.threads
        ring = torch.empty(count * self.block_bytes, dtype=torch.uint8, pin_memory=pin)
        return list(ring.view(count, self.block_bytes).unbind(0))

    def read(self, spilled: SpillFile, staging: list[torch.Tensor], landed: Landed) -> None:
        """Read the file through ``staging`` (buffers of at least ``block_bytes``), calling ``landed(block, pieces)``
        on this thread for each block as it lands, in the order blocks land: ``block`` is its bytes in a staging
        buffer, ``pieces`` where they belong; the buffer is reused only after the fence ``landed`` returned did.
        ``PagingError`` if the file cannot be read whole (an error of ``landed`` or a fence is raised as it is);
        either way no reader is left running when it returns."""
        if not staging or any(buffer.numel() < self.block_bytes for buffer in staging):
            raise InvalidArgumentError(f"reading a spill file needs staging buffers of {self.block_bytes} bytes")
        with self._unlinked:
            self._reading += 1
        try:
            fd = os.open(spilled.path, os.O_RDONLY)
            try:
                self._read_blocks(spilled.path, fd, spilled.sizes, staging, landed)
            finally:
                os.close(fd)
        except OSError as exc:
            raise PagingError(f"reading the spill file {spilled.path} failed ({exc.strerror or exc})") from exc
        finally:
            with self._unlinked:
                self._reading -= 1
                self._unlinked.notify_all()

    def _read_blocks(
        self, path: Path, fd: int, sizes: tuple[int, ...], staging: list[torch.Tensor], landed: Landed
    ) -> None:
        """Every block of the file into a free staging buffer, ``threads`` at a time. A buffer is free until a read
        into it is started, and again once the fence of the block last read into it returned: when none is free,
        the oldest handed-on buffer's fence is waited for. On an error the running reads are waited for."""
        todo = deque(blocks(sizes, self.block_bytes))
        free = deque(range(len(staging)))
        handed_on: deque[tuple[int, Fence | None]] = deque()  # buffers whose block went to ``landed``, oldest first
        running: dict[Future[None], tuple[int, int, list[Piece]]] = {}
        at_once = min(self.threads, len(staging))

        def one(buffer: torch.Tensor, offset: int) -> None:
            got = _move(os.preadv, fd, [memoryview(buffer.numpy())], offset)
            if got != buffer.numel():
                raise PagingError(
                    f"the spill file {path} ends early ({buffer.numel() - got} bytes short at byte {offset + got})"
                )

        with ThreadPoolExecutor(at_once, thread_name_prefix="djinn-spill") as pool:
            try:
                while todo or running:
                    while todo and len(running) < at_once:
                        if not free:
                            index, fence = handed_on.popleft()
                            if fence is not None:
                                fence()
                            free.append(index)
                        offset, pieces = todo.popleft()
                        index, nbytes = free.popleft(), sum(end - first for _, first, end in pieces)
                        running[pool.submit(one, staging[index][:nbytes], offset)] = (index, nbytes, pieces)
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        index, nbytes, pieces = running.pop(future)
                        future.result()
                        handed_on.append((index, landed(staging[index][:nbytes], pieces)))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _write_blocks(self, path: Path, fd: int, sizes: tuple[int, ...], buffers: list[memoryview]) -> None:
        """Write every block of the file, ``threads`` at a time, each from the extents it covers. On an error the
        blocks not started are cancelled and the running ones waited for before it is raised."""

        def one(offset: int, pieces: list[Piece]) -> None:
            want = sum(end - first for _, first, end in pieces)
            got = _move(os.pwritev, fd, [buffers[i][first:end] for i, first, end in pieces], offset)
            if got != want:
                raise PagingError(f"the spill file {path} took {got} of {want} bytes at byte {offset}")

        with ThreadPoolExecutor(self.threads, thread_name_prefix="djinn-spill") as pool:
            futures = [pool.submit(one, offset, pieces) for offset, pieces in blocks(sizes, self.block_bytes)]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def remove(self, spilled: SpillFile) -> None:
        """Forget the file now and unlink it on the reaper thread (see the module docstring)."""
        with self._lock:
            if spilled.path not in self.files:
                return
            self.files.discard(spilled.path)
            self.used -= spilled.nbytes
            self._doomed += 1
            if self._reaper is None:
                self._reaper = queue.SimpleQueue()
                threading.Thread(target=self._reap, args=(self._reaper,), name="djinn-unlink", daemon=True).start()
            self._reaper.put(spilled.path)

    def _reap(self, doomed: queue.SimpleQueue[Path]) -> None:
        while True:
            path = doomed.get()
            try:
                self._free_blocks(path)
                path.unlink(missing_ok=True)
            except OSError:
                pass  # it holds nobody's state any more; a store opened after this daemon removes it
            with self._unlinked:
                self._doomed -= 1
                self._unlinked.notify_all()

    def _free_blocks(self, path: Path) -> None:
        """Truncate the file to nothing from its end, ``REAP_STEP`` bytes at a time, each step while no read is
        under way."""
        fd = os.open(path, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            while size > 0:
                with self._unlinked:
                    self._unlinked.wait_for(lambda: self._reading == 0)
                size = max(size - REAP_STEP, 0)
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def settle(self) -> None:
        """Return once every removed file is unlinked."""
        with self._unlinked:
            self._unlinked.wait_for(lambda: self._doomed == 0)

    def close(self) -> None:
        with self._lock:
            for path in self.files:
                path.unlink(missing_ok=True)
            self.files.clear()
            self.used = 0
        self.settle()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"folder": str(self.folder), "capacity": self.capacity, "used": self.used,
                    "files": len(self.files), "threads": self.threads, "block_bytes": self.block_bytes,
                    "staging_bytes": 2 * self.threads * self.block_bytes}
