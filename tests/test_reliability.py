"""Memory safety of the shared runtime, from the stress findings of 2026-12-02 (issue 17).

Each numbered finding has a regression test here: (1) a page-out after reading the activation, and page-outs
that fail half-way; (2) resumes and paging under pressure from many threads (a lock cycle deadlocked this);
(3) reading the activation while another thread pages the session; (4) runs already admitted never fail for
memory; (5) pausing on the embedding input (integer ids, not a float activation). Tests marked with ``kind``
run both in-process and against a real daemon process; the conftest watchdog turns a deadlock into a failure
with every thread's stack.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE, PROMPT, make_engine, reference
from daemon_util import ROOT
from djinn_kernel.memory import MiB, LRUPolicy, MemoryManager

KINDS = ["inprocess", "daemon"]
IDS = list(range(5, 21))  # a prompt of exactly 16 tokens, so reservations are known to the byte
NEW = 8


def run_bytes(model: dj.Model) -> int:
    """The reservation of one run of ``IDS`` with ``NEW`` tokens: its whole KV cache."""
    return model.info["kv_bytes_per_token"] * (len(IDS) + NEW)


def until_room(call: Callable[[], dj.Run]) -> dj.Run:
    """Retry a call that may be refused for memory while other runs hold it; a refusal changes nothing."""
    while True:
        try:
            return call()
        except dj.OutOfMemoryError:
            continue


# (1) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_page_out_after_reading_the_activation_keeps_the_session(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    tokens, _ = reference(model, PROMPT, NEW)
    with model.session() as s:
        s.break_at(2, tokens=0)
        run = s.generate(PROMPT, NEW)
        answer = run.pause.original
        answer.numpy()  # a NumPy view pins the answer's storage; the session's own memory must stay pageable
        moved = s.page_out()
        assert moved["bytes"] > 0 and moved["gpu_bytes"] == 0 and moved["host_bytes"] == moved["bytes"]
        assert s.status()["state"] == "paged"
        assert torch.equal(run.pause.original, answer), "read back through a page-in, bit for bit"
        s.page_out()
        run.resume()
        assert run.state == "finished" and run.tokens == tokens


def test_the_activation_answer_is_a_copy():
    engine = make_engine()
    model = dj.load("tiny-llama", backend=engine)
    with model.session() as s:
        s.break_at(1, tokens=0)
        s.generate(PROMPT, 2)
        answer = engine.activation(s.id)
        live = engine._session(s.id).run.pause.current
        assert answer.untyped_storage().data_ptr() != live.untyped_storage().data_ptr()
        answer.zero_()
        assert not torch.equal(engine.activation(s.id), answer), "changing the answer changes nothing inside"
    engine.shutdown()


def paused_session(engine, model: dj.Model, layer: int = 1, token: int = 2):
    s = model.session()
    s.break_at(layer, tokens=token)
    run = s.generate(PROMPT, NEW)
    assert run.paused
    return s, run


def test_a_page_out_failing_half_way_leaves_the_session_as_it_was(monkeypatch):
    engine = make_engine()
    model = dj.load("tiny-llama", backend=engine)
    tokens, _ = reference(model, PROMPT, NEW)
    s, run = paused_session(engine, model)
    held = engine._session(s.id).gpu_tensors()
    before = [t.clone() for t in held]
    memory = s.status()["memory"]
    real, calls = torch.UntypedStorage.resize_, itertools.count()

    def third_free_fails(storage, nbytes):
        if nbytes == 0 and next(calls) == 3:
            raise RuntimeError("injected failure")
        return real(storage, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", third_free_fails)
    with pytest.raises(dj.PagingError, match="nothing was paged"):
        s.page_out()
    monkeypatch.undo()
    assert s.status()["memory"] == memory and s.status()["state"] == "paused"
    assert engine.memory.pool.used == 0, "the host copies went back to the pool"
    assert all(torch.equal(a, b) for a, b in zip(before, engine._session(s.id).gpu_tensors()))
    run.finish()
    assert run.tokens == tokens
    s.close()
    engine.shutdown()


def test_memory_an_outside_buffer_pins_is_refused_before_anything_is_freed():
    engine = make_engine()
    model = dj.load("tiny-llama", backend=engine)
    tokens, _ = reference(model, PROMPT, NEW)
    s, run = paused_session(engine, model)
    engine._session(s.id).run.cache.layers[0].keys.numpy()  # what protocol.py once did to the live activation
    memory = s.status()["memory"]
    with pytest.raises(dj.PagingError, match="cannot be freed"):
        s.page_out()
    assert s.status()["memory"] == memory and engine.memory.pool.used == 0
    run.finish()
    assert run.tokens == tokens
    s.close()
    engine.shutdown()


def test_a_page_out_that_cannot_be_undone_marks_the_session_lost(monkeypatch):
    engine = make_engine()
    model = dj.load("tiny-llama", backend=engine)
    tokens, _ = reference(model, PROMPT, NEW)
    s, run = paused_session(engine, model)
    real, calls = torch.UntypedStorage.resize_, itertools.count()

    def no_way_back(storage, nbytes):
        if nbytes > 0 or next(calls) == 2:
            raise RuntimeError("injected failure")
        return real(storage, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", no_way_back)
    with pytest.raises(dj.PagingError):
        s.page_out()
    monkeypatch.undo()
    assert s.status()["state"] == "lost" and "could not be undone" in s.status()["memory"]["lost"]
    for call in (lambda: run.pause.original, run.resume, s.page_in, s.page_out, lambda: run.pause.scale(2.0)):
        with pytest.raises(dj.SessionLostError, match="close it and open a new one"):
            call()
    assert run.cancel().state == "cancelled", "cancelling unwinds the forward without reading its memory"
    with pytest.raises(dj.SessionLostError):
        s.generate(PROMPT, 2)
    s.close()
    assert engine.memory.pool.used == 0
    assert reference(model, PROMPT, NEW)[0] == tokens, "other sessions are untouched"
    engine.shutdown()


# (2) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sessions_resuming_and_paging_under_pressure_do_not_deadlock(kind, backends):
    probe = dj.load("tiny-llama", backend=backends(kind))
    budget = int(run_bytes(probe) * 2.5)  # two runs at a time; everything else must be paged
    model = dj.load("tiny-llama", backend=backends(kind, budget))
    tokens, _ = reference(model, IDS, NEW)
    sessions = [model.session() for _ in range(4)]
    results: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def drive(s: dj.Session) -> None:
        try:
            s.break_at(1)  # every token step
            run = until_room(lambda: s.generate(IDS, NEW))
            while run.paused:
                run = until_room(run.resume)
            results[s.id] = run.tokens
        except BaseException as exc:  # noqa: BLE001 - reported below, with the thread's failure
            failures.append(exc)

    def pester() -> None:
        try:
            for i in range(150):
                s = sessions[i % len(sessions)]
                s.page_out()
                until_room(s.page_in)
                s.status()
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=drive, args=(s,)) for s in sessions] + [threading.Thread(target=pester)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert results == {s.id: tokens for s in sessions}
    for s in sessions:
        s.close()


# (3) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_reading_the_activation_while_another_thread_pages_it(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    tokens, _ = reference(model, PROMPT, NEW)
    with model.session() as s:
        s.break_at(1, tokens=0)
        run = s.generate(PROMPT, NEW)
        first = run.pause.original
        reads: list[torch.Tensor] = []
        rounds = 400 if kind == "inprocess" else 60

        def pager() -> None:
            for _ in range(rounds):
                s.page_out()
                s.page_in()

        t = threading.Thread(target=pager)
        t.start()
        for _ in range(rounds):
            reads.append(run.pause.original)
        t.join()
        assert all(torch.equal(first, r) for r in reads)
        run.resume()
        assert run.tokens == tokens


# (4) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_new_run_pages_a_paused_one_out_and_both_finish(kind, backends):
    probe = dj.load("tiny-llama", backend=backends(kind))
    budget = int(run_bytes(probe) * 1.5)
    model = dj.load("tiny-llama", backend=backends(kind, budget))
    tokens, _ = reference(model, IDS, NEW)
    with model.session() as a, model.session() as b:
        a.break_at(2, tokens=3)
        run_a = a.generate(IDS, NEW)
        assert run_a.paused
        run_b = b.generate(IDS, NEW)
        assert run_b.state == "finished" and run_b.tokens == tokens
        assert a.status()["state"] == "paged", "admitting b paged the paused a out"
        run_a.resume()
        assert run_a.state == "finished" and run_a.tokens == tokens


def test_a_running_run_that_outgrows_its_reservation_still_finishes():
    memory = MemoryManager(torch.device(DEVICE), 1, 1 << 30, LRUPolicy(), chunk_bytes=MiB)
    engine = make_engine(memory=memory)
    model = dj.load("tiny-llama", backend=engine)
    engine._model("tiny-llama").kv_bytes_per_token = 0  # an estimate that is far too low
    with model.session() as s:
        run = s.generate(IDS, NEW)
        assert run.state == "finished" and len(run.tokens) == NEW
    assert memory.stats()["overcommits"] > 0, "the budget bent for the admitted run instead of failing it"
    engine.shutdown()


# (5) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_pause_on_the_embedding_input_pages_and_reports(kind, backends):
    backend = backends(kind)
    model = dj.load("tiny-llama", backend=backend)
    tokens, _ = reference(model, IDS, NEW)
    with model.session() as s:
        s.break_at("model.embed_tokens", side="input", tokens=0)
        run = s.generate(IDS, NEW)
        assert run.pause.original.tolist() == [IDS]
        moved = s.page_out()
        assert moved["bytes"] > 0 and s.status()["state"] == "paged"
        listed = {x["id"]: x for x in backend.status()["sessions"]}
        assert listed[s.id]["state"] == "paged" and listed[s.id]["run"]["prompt_ids"] == IDS
        assert run.refresh().prompt_ids == IDS
        run.resume()
        assert run.state == "finished" and run.tokens == tokens


def test_the_interpreter_exits_with_a_paged_paused_run():
    code = textwrap.dedent(
        f"""
        import djinn_kernel as dj
        from djinn_kernel.engine import Engine
        model = dj.load("tiny-llama", backend=Engine(device={DEVICE!r}))
        s = model.session()
        s.break_at("model.embed_tokens", side="input", tokens=0)
        s.generate({IDS!r}, 4)
        s.page_out()
        print("paused and paged")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "paused and paged"
