"""The disk tier: sessions paged to the host spill to files when the host pool is full, come back bit for bit,
and leave no file behind (close, client death, engine shutdown, a crashed daemon's leftovers); a full disk
loses nothing."""

from __future__ import annotations

import errno
import json
import os
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE, PROMPT, make_engine, reference
from daemon_util import DaemonProcess, wait_until
from djinn_kernel import cli, spill
from djinn_kernel.errors import InvalidArgumentError, OutOfMemoryError, PagingError
from djinn_kernel.memory import MemoryManager, MiB
from djinn_kernel.report import format_status
from djinn_kernel.spill import SpillStore, blocks


def left(memory: MemoryManager, folder: Path) -> list[Path]:
    """The files in the spill folder once the store's pending unlinks ran (they run off the caller's path)."""
    memory.spill.settle()
    return list(folder.iterdir())


def manager(folder, host: int = 2 * MiB, disk: int = 64 * MiB) -> MemoryManager:
    return MemoryManager(torch.device("cpu"), 1 << 40, host, chunk_bytes=MiB, spill=SpillStore(folder, disk))


def session_of(memory: MemoryManager, sid: int, fill: float) -> torch.Tensor:
    t = torch.full((MiB // 4,), fill)  # 1 MiB
    memory.register(sid, lambda: [t])
    return t


def test_a_full_host_pool_spills_the_least_recently_used_and_brings_it_back_exact(tmp_path):
    memory = manager(tmp_path)
    kv = {sid: session_of(memory, sid, float(sid)) for sid in (1, 2, 3)}
    expected = {sid: t.clone() for sid, t in kv.items()}
    memory.page_out(1)
    memory.page_out(2)
    assert memory.pool.used == 2 * MiB
    memory.page_out(3)  # no room on the host: 1, the least recently used, goes to disk
    assert memory.session(1).disk_bytes() == MiB and memory.session(1).host_bytes() == 0
    assert [p.name for p in tmp_path.iterdir()] and memory.stats()["spill"]["used"] == MiB
    assert memory.session_stats(1)["disk_bytes"] == MiB and memory.session_stats(1)["paged"]
    memory.page_in(1)  # straight from the file through the staging ring: the full pool spills nobody for it
    assert torch.equal(kv[1], expected[1])
    assert memory.spills == 1 and memory.unspills == 1 and memory.pool.used == 2 * MiB
    assert memory.session(2).host_bytes() == MiB and left(memory, tmp_path) == []
    memory.page_in(2)
    memory.page_in(3)
    assert all(torch.equal(kv[sid], expected[sid]) for sid in kv)
    assert left(memory, tmp_path) == [] and memory.spill.used == 0 and memory.pool.used == 0


def test_closing_a_spilled_session_removes_its_file(tmp_path):
    memory = manager(tmp_path, host=MiB)
    for sid in (1, 2):
        session_of(memory, sid, 0.5)
        memory.page_out(sid)
    assert len(list(tmp_path.iterdir())) == 1
    memory.release(1)
    assert left(memory, tmp_path) == [] and memory.spill.used == 0


@pytest.mark.parametrize("why", ["capacity", "disk full"])
def test_a_full_disk_refuses_and_loses_nothing(tmp_path, monkeypatch, why):
    memory = manager(tmp_path, host=MiB, disk=MiB // 2 if why == "capacity" else 64 * MiB)
    first, second = session_of(memory, 1, 1.0), session_of(memory, 2, 2.0)
    memory.page_out(1)
    if why == "disk full":
        real_pwritev = os.pwritev

        def full(fd, buffers, offset):
            real_pwritev(fd, [b"partial"], offset)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OutOfMemoryError, match="full"):
        memory.page_out(2)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [], "no partial file is left"
    assert memory.session(1).host_bytes() == MiB and not memory.session(2).is_paged
    assert torch.equal(second, torch.full_like(second, 2.0))
    memory.page_in(1)
    assert torch.equal(first, torch.full_like(first, 1.0))


ODD = (1, 4095, 4097, 12345, 3 * 4096, 70001)  # extent sizes that straddle 4 KiB blocks every way


def odd_tensors(sid: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(sid)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in ODD]


def odd_session(memory: MemoryManager, sid: int) -> list[torch.Tensor]:
    kv = odd_tensors(sid)
    memory.register(sid, lambda: kv)
    return kv


def spilled_odd_session(folder, **store) -> tuple[MemoryManager, list[torch.Tensor], list[torch.Tensor]]:
    """Session 1 (extents of ``ODD`` sizes) spilled to disk by session 2, in a pool that holds one of them."""
    memory = MemoryManager(torch.device("cpu"), 1 << 40, sum(ODD), chunk_bytes=sum(ODD),
                           spill=SpillStore(folder, 64 * MiB, **{"threads": 3, "block_bytes": 4096, **store}))
    kv, expected = odd_session(memory, 1), odd_tensors(1)
    odd_session(memory, 2)
    memory.page_out(1)
    memory.page_out(2)
    assert memory.session(1).disk_bytes() == sum(ODD)
    return memory, kv, expected


@pytest.mark.parametrize("sizes", [ODD, (7,) * 3000 + ODD])
def test_blocks_cover_every_extent_once_in_file_order(sizes):
    for block in (4096, 8192, 1 << 20):
        cut = blocks(sizes, block)
        lengths = [sum(end - first for _, first, end in pieces) for _, pieces in cut]
        assert [offset for offset, _ in cut] == [sum(lengths[:k]) for k in range(len(cut))]
        assert all(0 < n <= block for n in lengths) and all(len(pieces) <= 1024 for _, pieces in cut)
        flat = [piece for _, pieces in cut for piece in pieces]
        for index, size in enumerate(sizes):
            mine = [(first, end) for i, first, end in flat if i == index]
            assert mine[0][0] == 0 and mine[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    assert [offset for offset, _ in blocks(ODD, 4096)] == list(range(0, sum(ODD), 4096))


def put(views: list[torch.Tensor], block: torch.Tensor, pieces) -> None:
    """Copy a landed block's bytes to where its pieces belong in ``views``."""
    at = 0
    for index, first, end in pieces:
        views[index][first:end] = block[at : at + end - first]
        at += end - first


def test_a_file_of_thousands_of_small_extents_goes_and_comes_back_exact(tmp_path):
    store = SpillStore(tmp_path, 64 * MiB, threads=3, block_bytes=1 << 20)
    gen = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (7,) * 3000 + ODD]
    spilled = store.write(1, views)
    back = [torch.zeros_like(v) for v in views]
    store.read(spilled, store.staging(pin=False), lambda block, pieces: put(back, block, pieces))
    assert all(torch.equal(a, b) for a, b in zip(back, views))
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_a_removed_file_is_unlinked_off_the_callers_path_and_never_during_a_read(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "REAP_STEP", 1 << 20)  # the 3 MiB file is freed in three steps
    store = SpillStore(tmp_path, 64 * MiB, threads=2, block_bytes=1 << 20)
    gen = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=gen)]
    gone, read = store.write(1, views), store.write(2, views)
    back = [torch.zeros_like(v) for v in views]
    during: list[tuple[bool, int]] = []

    def landed(block, pieces):
        if not during:
            store.remove(gone)  # its bytes leave the accounting at once; the file waits for the read to end
        during.append((gone.path.stat().st_size, store.used))
        put(back, block, pieces)

    store.read(read, store.staging(pin=False), landed)
    assert torch.equal(back[0], views[0]) and len(during) == 3
    assert during == [(gone.nbytes, read.nbytes)] * 3, "no block freed while the read ran; the bytes left at once"
    store.settle()
    assert not gone.path.exists() and read.path.exists() and store.files == {read.path}
    store.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_a_spilled_session_read_in_many_blocks_by_several_threads_comes_back_exact(tmp_path, threads):
    memory, kv, expected = spilled_odd_session(tmp_path, threads=threads)
    (path,) = tmp_path.iterdir()
    assert path.stat().st_size == sum(ODD) and path.stat().st_mode & 0o777 == 0o600, "the owner's alone"
    memory.page_in(1)
    assert all(torch.equal(a, b) for a, b in zip(kv, expected))
    assert not memory.session(1).is_paged and memory.unspills == 1
    assert memory.spill.stats()["threads"] == threads and memory.spill.stats()["block_bytes"] == 4096


def test_each_block_goes_on_to_the_device_while_later_blocks_are_still_being_read(tmp_path, monkeypatch):
    """One reader that may read block k+1 only once block k was handed on: this finishes only if the copy of
    a block starts before the whole file is read (a serial read-then-copy would time out)."""
    memory, kv, expected = spilled_odd_session(tmp_path, threads=1)
    handed_on = threading.Semaphore(0)
    reads, real_preadv, real_read = [], os.preadv, memory.spill.read

    def paced(fd, buffers, offset):
        if reads and not handed_on.acquire(timeout=10):
            raise OSError(errno.ETIMEDOUT, "block not handed on before the next read")
        reads.append(offset)
        return real_preadv(fd, buffers, offset)

    def read(spilled, staging, landed):
        def landed_then_release(block, pieces):
            fence = landed(block, pieces)
            handed_on.release()
            return fence

        return real_read(spilled, staging, landed_then_release)

    monkeypatch.setattr(os, "preadv", paced)
    monkeypatch.setattr(memory.spill, "read", read)
    memory.page_in(1)
    assert len(reads) == len(blocks(ODD, 4096)) > 10
    assert all(torch.equal(a, b) for a, b in zip(kv, expected))


def test_a_page_in_from_disk_with_the_host_pool_full_spills_nobody_and_is_exact(tmp_path):
    memory, kv, expected = spilled_odd_session(tmp_path)
    assert memory.pool.used == memory.pool.capacity and memory.spills == 1
    memory.page_in(1)
    assert all(torch.equal(a, b) for a, b in zip(kv, expected))
    assert memory.spills == 1 and memory.unspills == 1, "no other session went to disk to make room"
    assert memory.session(2).host_bytes() == sum(ODD) and memory.pool.used == sum(ODD)
    assert left(memory, tmp_path) == [] and memory.spill.used == 0


@pytest.mark.parametrize("ring", [1, 2, 6])
def test_a_staging_block_is_read_into_again_only_after_its_copy_is_done(tmp_path, monkeypatch, ring):
    """Copies that finish only when their fence is waited for (as a queued H2D copy would): a block read into a
    buffer whose copy is still pending would copy the wrong bytes. Reads land out of order (random delays)."""
    store = SpillStore(tmp_path, 64 * MiB, threads=3, block_bytes=4096)
    views = odd_tensors(7)
    spilled = store.write(7, views)
    back = [torch.zeros_like(v) for v in views]
    pending: dict[int, tuple[torch.Tensor, list]] = {}  # buffer address -> (block, pieces) not yet copied
    landed_order, fenced_order = [], []
    real_preadv, delays = os.preadv, iter(torch.rand(1000, generator=torch.Generator().manual_seed(ring)).tolist())

    def slow(fd, buffers, offset):
        time.sleep(next(delays) / 500)
        return real_preadv(fd, buffers, offset)

    def landed(block, pieces):
        address = block.data_ptr()
        assert address not in pending, "read into a buffer whose copy was still pending"
        pending[address] = (block.clone(), pieces)  # what the block held when it landed
        landed_order.append(address)

        def fence():
            held, pieces = pending.pop(address)
            assert torch.equal(held, block), "the buffer changed before its copy was done"
            put(back, block, pieces)
            fenced_order.append(address)

        return fence

    monkeypatch.setattr(os, "preadv", slow)
    staging = store.staging(pin=False)[:ring]
    store.read(spilled, staging, landed)
    for address in list(pending):  # the copies still queued when the read returns: the caller waits for them
        held, pieces = pending.pop(address)
        put(back, held, pieces)
    assert all(torch.equal(a, b) for a, b in zip(back, views))
    assert len(landed_order) == len(blocks(ODD, 4096)) > 4 * ring, "every buffer was reused several times"
    assert fenced_order == landed_order[: len(fenced_order)], "buffers are reused oldest first"
    assert len(landed_order) - len(fenced_order) <= ring


@pytest.mark.parametrize("how", ["read error", "file cut short"])
def test_a_read_failing_half_way_leaves_the_session_on_disk_as_it_was(tmp_path, monkeypatch, how):
    memory, kv, expected = spilled_odd_session(tmp_path)
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()
    real_preadv, calls = os.preadv, []

    def failing(fd, buffers, offset):
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    if how == "read error":
        monkeypatch.setattr(os, "preadv", failing)
    else:
        os.truncate(path, sum(ODD) // 2)
    with pytest.raises(PagingError, match="Input/output error" if how == "read error" else "ends early"):
        memory.page_in(1)
    session = memory.session(1)
    assert session.disk_bytes() == sum(ODD) and session.resident_bytes() == 0 and session.is_paged
    assert all(t.untyped_storage().nbytes() == 0 for t in kv), "the device storages grown for it are freed"
    assert path.exists() and memory.spill.used == sum(ODD) and memory.spills == 1, "nobody else was spilled"
    assert memory.pool.used == sum(ODD) and memory.session(2).host_bytes() == sum(ODD)
    monkeypatch.undo()
    memory.page_in(2)
    assert all(torch.equal(a, b) for a, b in zip(memory.session(2).tensors(), odd_tensors(2)))
    if how == "read error":
        assert path.read_bytes() == before
        memory.page_in(1)
        assert all(torch.equal(a, b) for a, b in zip(kv, expected))
        assert left(memory, tmp_path) == [] and memory.spill.used == 0


def in_thread(work, *args) -> tuple[threading.Thread, list]:
    """Run ``work(*args)`` on a thread; the list gets its result or the exception it raised."""
    out: list = []

    def run():
        try:
            out.append(work(*args))
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def held_until(monkeypatch, name: str) -> tuple[threading.Event, threading.Event]:
    """Make ``os.<name>`` wait for ``go`` (setting ``started`` first): a disk write or read held in flight."""
    started, go, real = threading.Event(), threading.Event(), getattr(os, name)

    def held(fd, buffers, offset):
        started.set()
        if not go.wait(30):
            raise OSError(errno.ETIMEDOUT, "never let go")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, name, held)
    return started, go


def test_while_a_spill_is_written_other_sessions_page_and_the_spilled_one_waits(tmp_path, monkeypatch):
    memory = manager(tmp_path)  # the pool holds two sessions
    kv = {sid: session_of(memory, sid, float(sid)) for sid in (1, 2, 3, 4)}
    expected = {sid: t.clone() for sid, t in kv.items()}
    memory.page_out(1)
    memory.page_out(2)
    writing, go = held_until(monkeypatch, "pwritev")
    out3, out3_result = in_thread(memory.page_out, 3)  # no room: 1 spills, its file write held
    assert writing.wait(10) and memory.session(1).moving == "spill"
    in1, in1_result = in_thread(memory.page_in, 1)  # waits until 1's file is whole
    memory.page_in(2)  # the lock is free meanwhile: others page in, are read, and page out
    with memory.resident(4):
        assert torch.equal(kv[4], expected[4])
    memory.page_out(4)
    time.sleep(0.2)
    assert out3.is_alive() and in1.is_alive() and memory.session(1).is_paged
    go.set()
    out3.join(30)
    in1.join(30)
    assert not out3.is_alive() and not in1.is_alive()
    assert out3_result[0].direction == "out" and in1_result[0].direction == "in"
    assert memory.spills == 1 and memory.unspills == 1 and memory.session(3).host_bytes() == MiB
    for sid in kv:
        memory.page_in(sid)
    assert all(torch.equal(kv[sid], expected[sid]) for sid in kv)
    assert left(memory, tmp_path) == [] and memory.pool.used == 0 and memory.spill.used == 0


def test_a_page_out_that_needs_the_room_a_spill_under_way_makes_waits_for_it(tmp_path, monkeypatch):
    memory = manager(tmp_path, host=MiB)  # the pool holds one session
    kv = {sid: session_of(memory, sid, float(sid)) for sid in (1, 2, 3)}
    expected = {sid: t.clone() for sid, t in kv.items()}
    memory.page_out(1)
    writing, go = held_until(monkeypatch, "pwritev")
    out2, out2_result = in_thread(memory.page_out, 2)  # spills 1, its write held
    assert writing.wait(10)
    out3, out3_result = in_thread(memory.page_out, 3)  # nobody else to spill: waits for 1's spill, not an error
    time.sleep(0.2)
    assert out3.is_alive() and not out3_result
    go.set()
    out2.join(30)
    out3.join(30)
    assert [r.direction for r in out2_result + out3_result] == ["out", "out"]
    assert memory.spills == 2 and memory.pool.used == MiB and memory.spill.used == 2 * MiB
    for sid in kv:
        memory.page_in(sid)
    assert all(torch.equal(kv[sid], expected[sid]) for sid in kv)
    assert left(memory, tmp_path) == []


def test_while_a_page_in_reads_from_disk_others_page_and_spill(tmp_path, monkeypatch):
    memory = manager(tmp_path)  # the pool holds two sessions
    kv = {sid: session_of(memory, sid, float(sid)) for sid in (1, 2, 3, 4, 5)}
    expected = {sid: t.clone() for sid, t in kv.items()}
    for sid in (1, 2, 3):
        memory.page_out(sid)  # 1 to disk
    reading, go = held_until(monkeypatch, "preadv")
    in1, in1_result = in_thread(memory.page_in, 1)
    assert reading.wait(10) and memory.session(1).moving == "in"
    memory.page_in(2)
    memory.page_out(4)  # to the room 2 left
    memory.page_out(5)  # the pool is full: 3 spills (1, being read, is never a victim) while 1's read is held
    time.sleep(0.2)
    assert in1.is_alive() and memory.session(3).disk_bytes() == MiB and memory.spills == 2
    go.set()
    in1.join(30)
    assert not in1.is_alive() and in1_result[0].direction == "in"
    assert torch.equal(kv[1], expected[1]) and memory.unspills == 1
    for sid in kv:
        memory.page_in(sid)
    assert all(torch.equal(kv[sid], expected[sid]) for sid in kv)
    assert left(memory, tmp_path) == [] and memory.pool.used == 0 and memory.spill.used == 0


@pytest.mark.parametrize("options", [{"threads": 0}, {"threads": 1.5}, {"threads": True}, {"block_bytes": 0},
                                     {"block_bytes": 1000}, {"block_bytes": 4096 + 1}, {"block_bytes": "16MiB"}])
def test_the_disk_tiers_thread_count_and_block_size_are_checked(tmp_path, options):
    with pytest.raises(InvalidArgumentError):
        SpillStore(tmp_path, MiB, **options)


def test_djinn_serve_refuses_a_bad_thread_count_or_block_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    spill = ["serve", "--device", "cpu", "--spill-dir", str(tmp_path / "spill")]
    assert cli.main([*spill, "--spill-threads", "0"]) == 2
    assert cli.main([*spill, "--spill-block", "1000"]) == 2
    err = capsys.readouterr().err
    assert "at least one IO thread" in err and "multiple of 4096" in err


def test_a_crashed_daemons_files_are_removed_when_the_folder_is_opened_again(tmp_path):
    dead = tmp_path / "djinn-999999999-s1-1.spill"
    dead.write_bytes(b"x")
    mine = tmp_path / f"djinn-{os.getpid()}-s1-1.spill"  # a live process's: kept
    mine.write_bytes(b"x")
    SpillStore(tmp_path, MiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


def paused_sessions_beyond_the_host(model, count: int):
    sessions = [model.session() for _ in range(count)]
    runs = []
    for s in sessions:
        s.break_at(2, tokens=3)
        runs.append(s.generate(PROMPT, 6, keep_logits=True))
        s.page_out()
    return sessions, runs


@pytest.fixture(scope="module")
def paused_bytes():
    """Host bytes one paused session of the test takes, so pools can be sized to hold two and a half."""
    engine = make_engine()
    model = dj.load("tiny-llama", backend=engine)
    (s,), _ = paused_sessions_beyond_the_host(model, 1)
    nbytes = s.status()["memory"]["host_bytes"]
    engine.shutdown()
    return nbytes


def test_paused_sessions_spilled_to_disk_resume_exact(tmp_path, paused_bytes):
    tokens, logits = reference(dj.load("tiny-llama", backend=make_engine()), max_new_tokens=6)
    host = int(paused_bytes * 2.5)
    memory = MemoryManager(torch.device(DEVICE), 1 << 40, host, chunk_bytes=host, spill=SpillStore(tmp_path, 1 << 30))
    engine = make_engine(memory=memory)
    model = dj.load("tiny-llama", backend=engine)
    sessions, runs = paused_sessions_beyond_the_host(model, 6)
    spilled = [s for s in sessions if s.status()["memory"]["disk_bytes"] > 0]
    assert len(spilled) == 4 and memory.stats()["spill"]["files"] == 4
    for s, run in zip(sessions, runs):
        run.finish()
        assert run.tokens == tokens and torch.equal(run.logits, logits)
    assert memory.spills >= len(spilled) and memory.unspills >= len(spilled)
    for s in sessions:
        s.close()
    assert left(memory, tmp_path) == []
    engine.shutdown()


CLIENT = textwrap.dedent(
    """
    import json, sys, djinn_kernel as dj
    model = dj.load("tiny-llama", backend=dj.connect())
    sessions = []
    for _ in range(6):
        s = model.session()
        s.break_at(2, tokens=3)
        s.generate(%r, 6)
        s.page_out()
        sessions.append(s)
    print(json.dumps([s.status()["memory"]["disk_bytes"] for s in sessions]), flush=True)
    sys.stdin.readline()
    """
)


def test_through_the_daemon_spilled_state_is_exact_and_a_dead_clients_files_go(tmp_path, paused_bytes):
    host = str(int(paused_bytes * 2.5))
    daemon = DaemonProcess("--host-memory", host, "--spill-dir", str(tmp_path), "--spill-memory", "1GiB")
    try:
        model = dj.load("tiny-llama", backend=daemon.client())
        tokens, logits = reference(model, max_new_tokens=6)
        sessions, runs = paused_sessions_beyond_the_host(model, 6)
        assert sum(bool(s.status()["memory"]["disk_bytes"]) for s in sessions) == 4
        for run in runs:
            run.finish()
            assert run.tokens == tokens and torch.equal(run.logits, logits)
        for s in sessions:
            s.close()
        wait_until(lambda: list(tmp_path.iterdir()) == [], 20, "spill files of closed sessions unlinked")
        assert "disk tier" in format_status(daemon.client().status())
        p = daemon.script(CLIENT % (PROMPT,))
        assert any(json.loads(p.stdout.readline()))
        assert list(tmp_path.iterdir())
        p.kill()
        p.wait()
        wait_until(lambda: list(tmp_path.iterdir()) == [], 20, "spill files of a dead client removed")
    finally:
        daemon.stop()
