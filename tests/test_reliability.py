"""Memory safety of the shared runtime, from the stress findings of 2026-12-02 (issue 17).

Each numbered finding has a regression test here: (1) a page-out after reading the activation, and page-outs
that fail half-way; (2) resumes and paging under pressure from many threads (a lock cycle deadlocked this);
(3) reading the activation while another thread pages the session; (4) runs already admitted never fail for
memory; (5) pausing on the embedding input (integer ids, not a float activation). Tests marked with ``kind``
run both in-process and against a real daemon process; the conftest watchdog turns a deadlock into a failure
with every thread's stack. (6), from issue 13: many clients and threads against one daemon while other clients'
leases run out, under a watchdog of its own that also dumps the daemon's threads.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE, PROMPT, budget_for, make_engine, reference, scaled
from daemon_util import ROOT, DaemonProcess, wait_until
from djinn_kernel.memory import MiB, LRUPolicy, MemoryManager

KINDS = ["inprocess", "daemon"]
IDS = list(range(5, 21))  # a prompt of exactly 16 tokens, so reservations are known to the byte
NEW = 8


def runs_of(runs: float) -> int:
    """A budget that admits a run of ``IDS`` with ``NEW`` tokens and holds ``runs`` such runs' KV."""
    return budget_for(runs, len(IDS), NEW)


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
    budget = runs_of(2.5)  # two runs at a time; everything else must be paged
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
    budget = runs_of(1.5)
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
    loaded = engine._model("tiny-llama")
    loaded.kv_bytes_per_token = 0  # an estimate that is far too low
    loaded.prefill_bytes = lambda new, context, fast: 0
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


# (6) ------------------------------------------------------------------------------------------------------
# Many threads of several clients open, pause, page, resume and close sessions at once against a daemon with a
# 1 s lease and a budget of 2.5 runs, while other clients' leases run out: some SIGKILLed, some frozen (SIGSTOP)
# past their lease with calls in flight and thawed after the reclaim.
LAPSING_CLIENT = """
import json, sys, threading, time, djinn_kernel as dj
cfg = json.loads(sys.stdin.readline())
model = dj.load("tiny-llama", backend=dj.connect(name="lapsing"))

def until_room(call):
    while True:
        try:
            return call()
        except dj.OutOfMemoryError:
            time.sleep(0.005)

sessions = [model.session() for _ in range(2)]
for s in sessions:
    s.break_at(1)
runs = [until_room(lambda: s.generate(cfg["ids"], cfg["new"])) for s in sessions]
unexpected = []

def churn(s, run):
    try:
        while True:  # until the daemon reclaims the session, so the lease runs out with calls in flight
            run = until_room(run.resume) if run.paused else until_room(lambda: s.generate(cfg["ids"], cfg["new"]))
            s.page_out()
    except dj.SessionClosedError:
        pass
    except Exception as exc:
        unexpected.append(repr(exc))

threads = [threading.Thread(target=churn, args=pair) for pair in zip(sessions, runs)]
for t in threads:
    t.start()
print(json.dumps([s.id for s in sessions]), flush=True)
sys.stdin.readline()  # after the thaw (a SIGKILLed client never gets here)
for t in threads:
    t.join()
gone = []
for s in sessions:
    try:
        s.status()
    except dj.SessionClosedError:
        gone.append(s.id)
with model.session() as s:
    tokens = until_room(lambda: s.generate(cfg["ids"], cfg["new"])).tokens
print(json.dumps({"gone": gone, "tokens": tokens, "unexpected": unexpected}), flush=True)
"""


def stacks_of_this_process() -> str:
    """Every thread's stack in the test process, for a watchdog's failure message."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def join_or_dump(threads: list[threading.Thread], seconds: float, daemon: DaemonProcess) -> None:
    """The watchdog: every thread must end within ``seconds``; else fail with the stacks of this process's
    threads and of the daemon's (SIGUSR1 makes it write them to its log)."""
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        os.kill(daemon.info.pid, signal.SIGUSR1)
        wait_until(lambda: "Thread 0x" in daemon.log(), 10, "the daemon's stack dump")
        pytest.fail(
            f"deadlock? {stuck} still running after {seconds:.0f} s\n{stacks_of_this_process()}\n"
            f"--- the daemon's threads:\n{daemon.log()[-20000:]}"
        )


def test_many_clients_and_threads_with_leases_running_out_finish_exact_and_lose_nothing(backends):
    clients, threads_each, rounds = scaled(4, 6), scaled(3, 4), scaled(5, 25)
    waves = scaled(1, 4)  # each: one client SIGKILLed and one frozen, spread over the load
    total = clients * threads_each * rounds
    budget = runs_of(2.5)
    daemon = DaemonProcess("--gpu-memory", str(budget))
    try:
        watcher = daemon.client("watcher")
        tokens, _ = reference(dj.load("tiny-llama", backend=watcher), IDS, NEW)
        lapsing = [daemon.script(LAPSING_CLIENT) for _ in range(2 * waves)]
        for p in lapsing:  # they start (import torch) while the load below runs
            p.stdin.write(json.dumps({"ids": IDS, "new": NEW}) + "\n")
            p.stdin.flush()
        models = [dj.load("tiny-llama", backend=daemon.client(f"survivor-{i}")) for i in range(clients)]
        keepers = [model.session() for model in models]  # paused sessions that pagers page; they must live
        for s in keepers:
            s.break_at(2, tokens=3)
        held = [until_room(lambda: s.generate(IDS, NEW)) for s in keepers]
        finished: list[list[int]] = []
        failures: list[str] = []
        ended: list[str] = []
        progress = threading.Condition()  # notified at every finished run and at every driver's end
        done = threading.Event()

        def drive(model: dj.Model, seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(rounds):
                    with model.session() as s:
                        s.break_at(1, tokens=rng.randrange(NEW) if rng.random() < 0.5 else None)
                        run = until_room(lambda: s.generate(IDS, NEW))
                        while run.paused:
                            if rng.random() < 0.3:
                                s.page_out()
                            if rng.random() < 0.2:
                                until_room(s.page_in)
                            run = until_room(run.resume)
                        with progress:
                            finished.append(run.tokens)
                            progress.notify_all()
            except BaseException as exc:  # noqa: BLE001 - reported below with the thread's name
                failures.append(f"{threading.current_thread().name}: {exc!r}")
            finally:
                with progress:
                    ended.append(threading.current_thread().name)
                    progress.notify_all()

        def page(keeper: dj.Session) -> None:
            try:
                while not done.is_set():
                    keeper.page_out()
                    until_room(keeper.page_in)
                    keeper.status()
            except BaseException as exc:  # noqa: BLE001
                failures.append(f"{threading.current_thread().name}: {exc!r}")

        drivers = [
            threading.Thread(target=drive, args=(model, i * threads_each + j), name=f"drive-{i}-{j}")
            for i, model in enumerate(models) for j in range(threads_each)
        ]
        pagers = [threading.Thread(target=page, args=(k,), name=f"page-{k.id}") for k in keepers]
        lapsed = [(p, json.loads(p.stdout.readline())) for p in lapsing]  # up, their sessions churning
        start = time.monotonic()
        for t in drivers + pagers:
            t.start()
        watchdog = scaled(120, 1200)
        reclaimed_at = []  # runs finished when each wave's sessions had been reclaimed
        for wave in range(waves):
            with progress:  # bounded: a deadlock is reported by the watchdog below
                progress.wait_for(
                    lambda: len(finished) >= (wave + 1) * total // (waves + 1) or len(ended) == len(drivers), watchdog
                )
            lapse(watcher, *lapsed[2 * wave:2 * wave + 2])
            reclaimed_at.append(len(finished))
        join_or_dump(drivers, watchdog, daemon)
        done.set()
        join_or_dump(pagers, 60, daemon)

        assert failures == []
        assert len(finished) == total and all(t == tokens for t in finished)
        listed = {s["id"] for s in watcher.status()["sessions"]}
        assert {k.id for k in keepers} <= listed, "a session that should live was lost"
        for run in held:
            assert until_room(run.finish).tokens == tokens
        for p, sids in lapsed:
            assert not listed & set(sids), "an expired client's session outlived its lease"
        for p, sids in lapsed[1::2]:  # the thawed ones
            report = json.loads(p.stdout.readline())
            assert report["gone"] == sids and report["unexpected"] == [] and report["tokens"] == tokens, report
            assert p.wait(60) == 0, p.stderr.read()
        for keeper in keepers:
            keeper.close()
        status = watcher.status()
        assert status["sessions"] == [] and status["reclaimed_clients"] >= 2 * waves
        memory = status["memory"]
        assert memory["session_gpu_bytes"] == memory["charged_bytes"] == memory["host_pool"]["used"] == 0, memory
        print(
            f"\nstress: {clients} clients x {threads_each} threads x {rounds} runs and {clients} pagers, "
            f"{len(finished)} runs all exact, {time.monotonic() - start:.1f} s; {waves} clients SIGKILLed and "
            f"{waves} frozen past the 1 s lease, all reclaimed, by waves with {reclaimed_at} runs done "
            f"({status['reclaimed_clients']} clients reclaimed in all); "
            f"{memory['page_outs']} page-outs, {memory['page_ins']} page-ins, {memory['overcommits']} overcommits"
        )
    finally:
        daemon.stop()


Lapsing = tuple[subprocess.Popen, list[int]]  # a lapsing client's process and the ids of its sessions


def lapse(watcher, killed: Lapsing, frozen: Lapsing) -> None:
    """Let two clients' leases run out while the load runs: ``killed`` SIGKILLed, ``frozen`` stopped (SIGSTOP)
    until the daemon has reclaimed both one's sessions, then thawed."""
    killed[0].send_signal(signal.SIGKILL)
    frozen[0].send_signal(signal.SIGSTOP)
    both = {*killed[1], *frozen[1]}
    wait_until(lambda: not both & {s["id"] for s in watcher.status()["sessions"]}, 60, "the lapsed clients' reclaim")
    frozen[0].send_signal(signal.SIGCONT)
    frozen[0].stdin.write("thawed\n")
    frozen[0].stdin.flush()
    killed[0].wait()
