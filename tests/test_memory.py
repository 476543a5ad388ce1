"""The memory manager: host pool bookkeeping, exact storage-level paging, LRU under pressure, clear OOM."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE, PROMPT, budget_for, drain, make_engine, reference
from djinn_kernel.engine import Engine
from djinn_kernel.host_pool import HostPool
from djinn_kernel.memory import GiB, MiB, LRUPolicy, MemoryManager, parse_bytes


@pytest.mark.parametrize("text, value", [("16GiB", 16 * GiB), ("512MiB", 512 * MiB), ("2G", 2 * GiB), ("1e3", 1000), (7, 7)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "-1GiB", True, None])
def test_parse_bytes_rejects(bad):
    with pytest.raises(dj.InvalidArgumentError):
        parse_bytes(bad)


def test_host_pool_first_fit_coalesce_and_growth():
    pool = HostPool(capacity=1000, chunk_bytes=400)
    a, b, c = pool.alloc(100), pool.alloc(200), pool.alloc(100)
    assert (a.chunk, a.offset, b.offset, c.offset) == (0, 0, 100, 300) and pool.reserved == 400
    pool.free(b)
    assert pool.alloc(150).offset == 100, "first fit reuses the hole"
    d = pool.alloc(300)  # no hole of 300 left in chunk 0: a new chunk
    assert d.chunk == 1 and pool.reserved == 800 and pool.used == 650
    for e in (a, c, d):
        pool.free(e)
    assert pool.alloc(300).chunk == 0 or pool.used == 450
    with pytest.raises(dj.OutOfMemoryError, match="host pool is full"):
        pool.alloc(10_000)
    big = HostPool(capacity=4096, chunk_bytes=400)
    assert big.alloc(600).nbytes == 600 and big.reserved == 1024, "an oversized request grows by a power of two"


def test_host_pool_reserve_up_front():
    pool = HostPool(capacity=2000, chunk_bytes=300, reserve=700)
    assert pool.reserved == 900 and pool.used == 0
    extents = [pool.alloc(250), pool.alloc(250), pool.alloc(250)]
    assert pool.stats()["grown_on_swap_path"] == 0, "the page-outs found their room pinned"
    extents.append(pool.alloc(250))
    assert pool.stats()["grown_on_swap_path"] == 1
    for extent in extents:
        pool.free(extent)


def test_extent_views_write_through():
    pool = HostPool(capacity=100, chunk_bytes=100)
    e = pool.alloc(10)
    e.view.fill_(7)
    assert pool._chunks[0][:10].eq(7).all()


def paging_engine(budget: int = 1 << 40, host: int = 1 << 30, eager: bool = False) -> Engine:
    memory = MemoryManager(torch.device(DEVICE), budget, host, LRUPolicy(eager=eager), chunk_bytes=1 * MiB)
    return make_engine(memory=memory)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_eager_paging_at_every_pause_is_exact(name):
    engine = paging_engine(eager=True)
    model = dj.load(name, backend=engine)
    tokens, logits = reference(model)
    with model.session() as s:
        s.break_at(1)
        s.break_at(3, side="input")
        run = s.generate(PROMPT, 8, keep_logits=True)
        pauses = 0
        while run.paused:
            stats = s.status()
            assert stats["state"] == "paged"
            assert stats["memory"]["gpu_bytes"] == 0 and stats["memory"]["host_bytes"] > 0
            pauses += 1
            run.resume()
        assert pauses == 16
        assert run.tokens == tokens and torch.equal(run.logits, logits)
    stats = engine.memory.stats()
    assert stats["page_outs"] == 16 and stats["page_ins"] == 16
    assert stats["host_pool"]["used"] == 0, "every extent went back to the pool"
    engine.shutdown()


def test_page_out_frees_every_session_byte_and_restores_bits():
    engine = paging_engine()
    model = dj.load("tiny-llama", backend=engine)
    with model.session() as s:
        s.break_at(2, tokens=5)
        run = s.generate(PROMPT, 8)
        before = s.status()["memory"]["gpu_bytes"]
        activation = run.pause.activation.clone()
        kv = [t.clone() for t in engine._session(s.id).gpu_tensors()]
        kv_bytes = sum(t.numel() * t.element_size() for t in engine._session(s.id).gpu_tensors()[:-2])
        assert before >= kv_bytes > 0
        moved = engine.page_out(s.id)
        assert moved["bytes"] == before and moved["gpu_bytes"] == 0 and moved["host_bytes"] == before
        assert all(t.untyped_storage().nbytes() == 0 for t in engine._session(s.id).gpu_tensors())
        back = engine.page_in(s.id)
        assert back["bytes"] == before and back["gpu_bytes"] == before and back["host_bytes"] == 0
        assert all(torch.equal(a, b) for a, b in zip(kv, engine._session(s.id).gpu_tensors()))
        engine.page_out(s.id)
        assert torch.equal(run.pause.activation, activation), "inspecting a paged pause pages it back in"
        run.finish()
    engine.shutdown()


def test_lru_under_pressure_is_exact():
    probe = paging_engine()
    model = dj.load("tiny-llama", backend=probe)
    tokens, logits = reference(model, max_new_tokens=12)
    prompt_len = len(engine_prompt(probe, model))
    probe.shutdown()

    # Room to admit a run and for about one and a half sessions' KV at full length: the others must be paged out.
    budget = budget_for(1.5, prompt_len, 12)
    engine = paging_engine(budget=budget)
    model = dj.load("tiny-llama", backend=engine)
    sessions = [model.session() for _ in range(3)]
    runs = []
    for i, s in enumerate(sessions):
        s.break_at(i + 1, tokens=10)
        runs.append(s.generate(PROMPT, 12, keep_logits=True))
        assert runs[-1].paused
    states = [s.status()["state"] for s in sessions]
    assert states[:2] == ["paged", "paged"] and states[2] == "paused", "least recently used went first"
    assert engine.memory.resident_total() <= budget
    for run in runs:
        run.resume()
        assert run.state == "finished" and run.tokens == tokens and torch.equal(run.logits, logits)
        assert engine.memory.resident_total() <= budget
    for s in sessions:
        s.close()
    engine.shutdown()


def engine_prompt(engine: Engine, model: dj.Model) -> list[int]:
    return engine._model(model.info["id"]).encode(PROMPT, chat=False)


def test_full_host_pool_refuses_new_request_and_keeps_paused_sessions():
    probe = paging_engine()
    model = dj.load("tiny-llama", backend=probe)
    tokens, logits = reference(model)
    per_token = model.info["kv_bytes_per_token"]
    prompt_len = len(engine_prompt(probe, model))
    probe.shutdown()

    engine = paging_engine(budget=budget_for(30 / (prompt_len + 8), prompt_len, 8), host=per_token * 2)
    model = dj.load("tiny-llama", backend=engine)
    a, b = model.session(), model.session()
    a.break_at(1, tokens=4)
    run_a = a.generate(PROMPT, 8, keep_logits=True)
    assert run_a.paused
    with pytest.raises(dj.OutOfMemoryError, match="host pool is full"):
        b.generate(PROMPT, 8)
    assert a.status()["state"] == "paused" and engine.memory.pool.used == 0
    run_a.resume()
    assert run_a.tokens == tokens and torch.equal(run_a.logits, logits)
    b.break_at(0, once=True)
    with pytest.raises(dj.OutOfMemoryError, match="host pool is full"):
        b.generate(PROMPT, 2)  # a keeps its conversation's KV while idle, and the pool cannot take it
    a.close()
    assert b.generate(PROMPT, 2).paused, "once room is back, the refused session works"
    b.close()
    engine.shutdown()


def test_close_returns_host_extent():
    engine = paging_engine(eager=True)
    model = dj.load("tiny-gpt2", backend=engine)
    s = model.session()
    s.break_at(0)
    s.generate(PROMPT, 4)
    assert engine.memory.pool.used > 0
    s.close()
    assert engine.memory.pool.used == 0 and engine.memory.resident_total() == 0
    engine.shutdown()


def test_drain_helper_runs(llama_session):
    llama_session.break_at(0, once=True)
    assert len(drain(llama_session.generate(PROMPT, 2))) == 1


def test_session_page_out_through_the_api():
    engine = paging_engine()
    model = dj.load("tiny-gpt2", backend=engine)
    tokens, logits = reference(model)
    with model.session() as s:
        s.break_at(1, tokens=3)
        run = s.generate(PROMPT, 8, keep_logits=True)
        held = s.status()["memory"]["gpu_bytes"]
        moved = s.page_out()
        assert moved["bytes"] == held and moved["copies"] >= 1 and s.status()["state"] == "paged"
        assert s.page_in()["gpu_bytes"] == held and s.status()["state"] == "paused"
        s.page_out()
        run.resume()
        assert run.tokens == tokens and torch.equal(run.logits, logits)
    engine.shutdown()


def test_a_model_moves_to_a_new_engine_after_shutdown():
    from djinn_kernel.builtin import build_builtin

    net, _, _ = build_builtin("tiny-llama")
    for _ in range(2):
        engine = paging_engine()
        model = dj.Model(engine, engine.register_model("shared", net))
        with model.session() as s:
            s.break_at(1, tokens=0)
            assert len(drain(s.generate([5, 6, 7], 2))) == 1, "one pause per hit, not one per engine ever made"
        engine.shutdown()


def test_status_while_sessions_close_concurrently():
    """Listing sessions while another thread closes them (a client being reclaimed) never fails."""
    import threading

    engine = paging_engine()
    model = dj.load("tiny-llama", backend=engine)
    sessions = [model.session() for _ in range(40)]
    closer = threading.Thread(target=lambda: [s.close() for s in sessions])
    closer.start()
    while closer.is_alive():
        listed = engine.status()["sessions"]
        assert all(set(s["memory"]) == {"gpu_bytes", "host_bytes", "paged"} for s in listed)
    closer.join()
    assert engine.status()["sessions"] == []
    with pytest.raises(dj.SessionClosedError):
        engine.memory.session(sessions[0].id)
    engine.shutdown()


def test_a_budget_measured_from_free_memory_loses_the_weights_of_each_model():
    memory = MemoryManager(torch.device(DEVICE), 1 << 30, 1 << 20, budget_from_free_memory=True)
    engine = make_engine(memory=memory)
    info = engine.load_model("tiny-llama")
    assert memory.budget == (1 << 30) - info["weight_bytes"]
    given = MemoryManager(torch.device(DEVICE), 1 << 30, 1 << 20)
    other = make_engine(memory=given)
    other.load_model("tiny-llama")
    assert given.budget == 1 << 30, "a budget the operator gave is kept as given"
    engine.shutdown()
    other.shutdown()


def test_the_lock_is_free_while_a_session_moves(monkeypatch):
    """A page-out's copies run with the manager's lock released: other sessions are admitted and read meanwhile,
    the moving session is never a victim, and a page-in of it waits for the page-out, then restores it exactly."""
    import threading

    from djinn_kernel import memory as memory_module

    manager = MemoryManager(torch.device("cpu"), budget=1 << 20, host_capacity=1 << 20, policy=LRUPolicy())
    a, b = torch.arange(1000, dtype=torch.float32), torch.arange(2000, dtype=torch.float32)
    manager.register(1, lambda: [a])
    manager.register(2, lambda: [b])
    expected = a.clone()
    gate, entered = threading.Event(), threading.Event()
    original = memory_module._Worker.submit

    def gated(self, work):
        def held_back():
            entered.set()
            assert gate.wait(30), "the test never opened the gate"
            work()

        return original(self, held_back)

    monkeypatch.setattr(memory_module._Worker, "submit", gated)
    mover = threading.Thread(target=manager.page_out, args=(1,))
    mover.start()
    assert entered.wait(30)
    assert manager.session(1).moving == "out"
    monkeypatch.setattr(memory_module._Worker, "submit", original)  # what follows may copy at once
    with manager.resident(2):  # the lock is free: another session is held and read at once
        assert torch.equal(b, torch.arange(2000, dtype=torch.float32))
    manager.admit(2, 8000)
    assert manager.session(1).moving == "out"
    with pytest.raises(dj.OutOfMemoryError):  # the only other session moves: it is not a victim
        manager.make_room(1 << 30, for_sid=2)
    back = threading.Thread(target=manager.page_in, args=(1,))
    back.start()
    back.join(0.2)  # a bound, not a sync: the assertion can only fail if the page-in did not wait
    assert back.is_alive(), "a page-in of a moving session waits for the move to end"
    gate.set()
    mover.join(30)
    back.join(30)
    assert not manager.session(1).is_paged and manager.session(1).moving is None
    assert torch.equal(a, expected) and manager.page_outs == 1 and manager.page_ins == 1
