"""Djinn on a Ray cluster (djinn_kernel/cluster, migration.py): the placement policy alone, a session's state moved
between in-process engines, and a local Ray cluster whose engines stand in for GPUs (a custom resource):
placement as the policy says, migration bitwise exact, and a dead engine failing only its own sessions."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import djinn_kernel as dj
from djinn_kernel.edits import AddVector, Scale
from djinn_kernel.cluster.placement import EngineLoad, NoEngineError, SessionLoad, place, rebalance, split_pair
from djinn_kernel.engine import Engine
from djinn_kernel.errors import EngineLostError, InvalidArgumentError, SessionLostError

NEED = 100  # bytes placement counts per session in the policy tests


def load(index: int, budget: int = 1000, sessions: tuple[int, ...] = (), models: tuple[str, ...] = ("m",), **kw):
    return EngineLoad(index, budget, sessions, frozenset(models), **kw)


# the policy ---------------------------------------------------------------------------------------------------
def test_a_session_goes_where_its_model_is_resident_with_the_most_room():
    engines = [load(0, sessions=(0, 0, 0)), load(1, sessions=(0,)), load(2, models=())]
    assert place("m", engines, NEED) == place("m", engines, NEED)  # pure: same loads, same answer
    chosen = place("m", engines, NEED)
    assert (chosen.engine, chosen.load, chosen.rule) == (1, False, 1), "gpu2 is emptier but would have to load m"


def test_a_session_is_counted_at_least_need_so_a_burst_spreads():
    """Sessions opened but not yet run hold no bytes; counted at ``need`` they still fill an engine."""
    engines = [load(0, budget=250), load(1, budget=250)]
    placed = []
    for _ in range(4):
        chosen = place("m", engines, NEED)
        placed.append(chosen.engine)
        old = engines[chosen.engine]
        engines[chosen.engine] = load(old.index, old.budget, (*old.session_bytes, 0))
    assert placed == [0, 1, 0, 1]
    # A session holding more than ``need`` counts at what it holds.
    assert load(0, sessions=(700, 0)).headroom(NEED) == 1000 - 700 - 100


def test_ties_go_to_fewer_sessions_then_the_lower_index():
    assert place("m", [load(0, 1100, (0,)), load(1, 1000)], NEED).engine == 1  # same headroom, fewer sessions
    assert place("m", [load(0), load(1)], NEED).engine == 0


def test_when_every_resident_engine_is_full_the_model_is_loaded_on_another():
    full = load(0, budget=150, sessions=(0,))
    chosen = place("m", [full, load(1, models=(), sessions=(0,)), load(2, models=())], NEED)
    assert (chosen.engine, chosen.load, chosen.rule) == (2, True, 2)
    # Weights count against a budget measured from free GPU memory only.
    small = load(1, budget=400, models=(), weights_in_budget=True)
    assert place("m", [full, small], NEED, weight_bytes=350).rule == 3, "m's weights and a session do not fit on 1"
    assert place("m", [full, load(1, 400, models=())], NEED, weight_bytes=350).engine == 1


def test_when_nothing_has_room_the_resident_engine_with_the_most_is_oversubscribed():
    engines = [load(0, 150, (0,)), load(1, 180, (0,)), load(2, 50, models=())]
    chosen = place("m", engines, NEED)
    assert (chosen.engine, chosen.load, chosen.rule) == (1, False, 3)


def test_a_model_resident_nowhere_is_loaded_where_there_is_most_room():
    chosen = place("m", [load(0, 300, models=()), load(1, 900, models=("x",))], NEED)
    assert (chosen.engine, chosen.load, chosen.rule) == (1, True, 2)
    chosen = place("m", [load(0, 50, models=()), load(1, 80, models=())], NEED)
    assert (chosen.engine, chosen.load, chosen.rule) == (1, True, 4)


def test_a_split_goes_to_the_two_live_engines_with_the_most_room_the_host_first():
    engines = [load(0, sessions=(600,)), load(1, sessions=(100,)), load(2, alive=False), load(3, sessions=(300,))]
    assert split_pair(engines, need=0) == (1, 3)
    with pytest.raises(NoEngineError, match="a split needs two live engines; 1 is alive"):
        split_pair([load(0), load(1, alive=False)], need=0)


def test_a_split_models_stage_gone_or_restarted_empty_is_an_engine_lost_error_naming_it(monkeypatch):
    """cluster/stage.py with Ray stood in for: the stage actor dead, or back (Ray restarted it) without the layers
    (its session or model unknown there), fails the host's call with an EngineLostError naming the stage engine;
    its own errors otherwise come back as they are."""
    ray = pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError, RayTaskError

    from djinn_kernel.cluster.stage import ActorStage
    from djinn_kernel.errors import ModelNotFoundError, SessionClosedError

    class Actor:
        class call:  # noqa: N801 - the shape of a Ray actor method
            @staticmethod
            def remote(*args):
                return args

    raised: list[BaseException] = []
    monkeypatch.setattr(ray, "get", lambda ref: (_ for _ in ()).throw(raised[0]))
    stage = ActorStage(Actor(), "tiny-llama:layers0-1", "gpu2")
    for cause in (ActorDiedError(), RayTaskError("call", "", SessionClosedError("no session 3")),
                  RayTaskError("call", "", ModelNotFoundError("not loaded"))):
        raised[:] = [cause]
        with pytest.raises(EngineLostError, match="engine gpu2, which serves the first layers of tiny-llama"):
            stage.fork(3)
    raised[:] = [RayTaskError("call", "", InvalidArgumentError("bad layer"))]
    with pytest.raises(InvalidArgumentError, match="bad layer"):
        stage.fork(3)
    raised[:] = [RayTaskError("call", "", SessionClosedError("closed already"))]
    with pytest.raises(SessionClosedError):
        stage.close(3)  # the host closing it: the stage's own answer


def test_dead_engines_never_get_a_session():
    engines = [load(0, alive=False), load(1, budget=10, sessions=(0,))]
    assert place("m", engines, NEED).engine == 1
    with pytest.raises(NoEngineError):
        place("m", [load(0, alive=False)], NEED)


def test_rebalancing_moves_the_largest_movable_sessions_off_an_engine_over_its_budget():
    engines = [load(0), load(1, sessions=(100,)), load(2, budget=500)]
    sessions = [SessionLoad(1, 0, 600, True), SessionLoad(2, 0, 300, True), SessionLoad(3, 0, 200, False),
                SessionLoad(4, 1, 100, True)]
    assert rebalance(engines, sessions) == [(1, 1)], "600 bytes to the engine with the most room; 500 left: done"
    # The largest does not fit anywhere: the next does; a session that cannot move (running) stays.
    big = [SessionLoad(1, 0, 950, True), SessionLoad(2, 0, 300, True), SessionLoad(3, 0, 200, False)]
    assert rebalance([load(0), load(1, budget=400)], big) == [(2, 1)]
    assert rebalance([load(0), load(1, budget=100)], big) == [], "nothing fits elsewhere"
    # Within budget, nothing moves; a dead engine neither gives nor takes.
    assert rebalance(engines, [SessionLoad(1, 0, 1000, True)]) == []
    assert rebalance([load(0), load(1, alive=False)], [SessionLoad(1, 0, 1500, True)]) == []


# an engine's failures, with Ray stood in for (the Ray test below kills a real one) ---------------------------------
class _Ref:
    def __init__(self, answer):
        self.answer = answer


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return _Ref(lambda: self.fn(*args, **kwargs))


class _FakeRay:
    """ray.get / wait / kill over _Refs, answered at once."""

    def get(self, ref, timeout=None):
        return [r.answer() for r in ref] if isinstance(ref, list) else ref.answer()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def kill(self, actor):
        pass


class _FakeActor:
    """An engine actor whose next call fails with ``fail``; ``pid`` is its process (a restart changes it)."""

    def __init__(self, index: int):
        self.pid, self.fail = 100 + index, None
        self.describe = _Method(lambda: {"index": index, "pid": self.pid, "node": "n", "device": "cpu"})
        self.call = _Method(self._call)

    def _call(self, op, *args, **kwargs):
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return {"op": op}


def test_a_call_lost_in_transit_is_an_error_a_restart_loses_the_sessions_and_a_death_is_for_good():
    pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from djinn_kernel.cluster.backend import ClusterBackend, _Placed
    from djinn_kernel.errors import DjinnError

    actors = [_FakeActor(0), _FakeActor(1)]
    backend = ClusterBackend(_FakeRay(), actors, rebalance_s=None)
    gpu0, gpu1 = backend._engines
    backend._sessions.update({1: _Placed(gpu0, 1, "m", "me"), 2: _Placed(gpu1, 1, "m", "me")})
    gone = ActorUnavailableError("the actor is restarting", None)

    actors[0].fail = gone  # the same process answers afterwards: nothing was lost
    with pytest.raises(DjinnError, match="did not answer a call .* may or may not have run; .* intact") as transient:
        backend._call(gpu0, "status")
    assert not isinstance(transient.value, EngineLostError) and set(backend._sessions) == {1, 2}

    actors[0].fail, actors[0].pid = gone, 200  # Ray restarted it: a new process, empty
    with pytest.raises(EngineLostError, match=r"engine gpu0 \(pid 100, cpu\) died; its sessions \[1\]"):
        backend._call(gpu0, "status")
    assert gpu0.lost is None and gpu0.pid == 200 and set(backend._sessions) == {2}
    with pytest.raises(EngineLostError, match="session 1 was on gpu0, which died"):
        backend.describe_session(1)
    assert backend._failed(gpu0, 100, gone).args[0].startswith("engine gpu0 (pid 100"), "a late failure of pid 100"
    assert backend._call(gpu0, "status") == {"op": "status"}, "the restarted engine takes calls"

    actors[1].fail = ActorDiedError()  # out of restarts: dead for good, its session lost
    with pytest.raises(EngineLostError, match=r"engine gpu1 .* died; its sessions \[2\]"):
        backend._call(gpu1, "status")
    assert "Ray will not restart it" in gpu1.lost and backend._live() == [gpu0]
    with pytest.raises(EngineLostError, match="will not restart"):
        backend._call(gpu1, "status")


# a session's state between engines, in-process ---------------------------------------------------------------
FAST = pytest.mark.parametrize("fast", [False, True], ids=["module-path", "fast-path"])


def engine_for(fast: bool) -> Engine:
    return Engine(device="cpu", fast=True) if fast else Engine(device="cpu", deterministic=True)


@FAST
def test_an_imported_session_continues_bitwise_as_the_original(fast):
    def engine() -> Engine:
        return Engine(device="cpu", fast=True) if fast else Engine(device="cpu", deterministic=True)

    source, target = engine(), engine()
    try:
        model = dj.load("tiny-llama", backend=source)
        dj.load("tiny-llama", backend=target)
        session = model.session()
        session.steer(1, torch.full((model.hidden_size,), 0.05))
        session.generate("Hello, world", 6)
        state = source.export_session(session.id)
        assert state["kv"]["kind"] == ("blocks" if fast else "module")
        moved = target.import_session("tiny-llama", state)
        original = session.generate(" and then", 5, fresh=False, keep_logits=True)
        copy = target.generate(moved, " and then", 5, fresh=False, keep_logits=True)
        assert copy["tokens"] == original.tokens and copy["run_id"] == original.id == 2
        assert torch.equal(target.run_logits(moved), original.logits)
        assert target.describe_session(moved)["steering"] == session.steering
    finally:
        source.shutdown()
        target.shutdown()


def paused_run(engine: Engine, vector: torch.Tensor):
    """A session on ``engine`` whose second run stands at its third pause (layer 2 of token step 1), its first
    pause's activation edited and its second passed by a step; the third edited too."""
    model = dj.load("tiny-llama", backend=engine)
    session = model.session()
    session.steer(1, vector)
    session.generate("Hello, world", 4)
    session.break_at(1, tokens=0)
    session.break_at(2, tokens=1)
    run = session.generate(" and then", 5, fresh=False, keep_logits=True)
    assert (run.pause.layer, run.pause.token_step) == (1, 0)
    run.pause.apply(Scale(1.5))
    run.step()  # pause 2: the next layer's output, layer 2 of the prompt's forward
    assert (run.pause.layer, run.pause.token_step) == (2, 0)
    run.resume()
    assert (run.pause.layer, run.pause.token_step) == (2, 1)
    run.pause.apply(AddVector(vector, 2.0))
    return session, run


@FAST
def test_a_paused_run_moves_and_finishes_bitwise_as_the_unmoved_one(fast):
    """The moved run stands at the same pause with the same activations (edits included), and finishes with the
    same tokens and logits as the run that stayed; the source session is untouched by the export."""
    engines = [engine_for(fast) for _ in range(3)]
    source, target, alone = engines
    try:
        vector = torch.full((64,), 0.05)
        session, run = paused_run(source, vector)
        unmoved, twin = paused_run(alone, vector)
        dj.load("tiny-llama", backend=target)
        state = source.export_session(session.id)
        assert state["run"]["id"] == run.id == 2 and [c for c, _ in state["run"]["answers"]] == ["step", "continue"]
        moved = target.import_session("tiny-llama", state)
        snapshot = target.run_snapshot(moved)
        assert snapshot["state"] == "paused" and snapshot["run_id"] == 2 and snapshot["tokens"] == run.tokens
        assert snapshot["pause"] == run.pause.info and snapshot["pause"]["edits"] == 1
        assert torch.equal(target.activation(moved), run.pause.activation)
        assert torch.equal(target.activation(moved, original=True), twin.pause.original)
        assert [bp["hits"] for bp in target.describe_session(moved)["breakpoints"]] == [1, 1]
        finish_alike(target, moved, run, twin)
        assert target.describe_session(moved)["history_tokens"] == unmoved.status()["history_tokens"]
    finally:
        for engine in engines:
            engine.shutdown()


def finish_alike(target: Engine, moved: int, run, twin) -> None:
    """The moved run (session ``moved`` on ``target``), its unmoved twin and the source's own run finish with the
    same tokens and logits (the export left the source as it was)."""
    finished = target.resume(moved, "finish")
    twin.finish()
    assert finished["tokens"] == twin.tokens and torch.equal(target.run_logits(moved), twin.logits)
    run.finish()
    assert run.tokens == twin.tokens and torch.equal(run.logits, twin.logits)


def reconfigured_run(engine: Engine, vector: torch.Tensor):
    """A paused run whose session's configuration the user changed at each of its three pauses: steering and a
    breakpoint added at the first, the steering removed and another breakpoint added at the second, steering
    added at the third, where it stands (layer 0, token step 3)."""
    session = dj.load("tiny-llama", backend=engine).session()
    session.generate("Hello, world", 4)
    session.break_at(1, tokens=0)
    run = session.generate(" and then", 5, fresh=False, keep_logits=True)
    session.steer(3, vector)
    session.break_at(2, tokens=2)
    run.resume()
    assert (run.pause.layer, run.pause.token_step) == (2, 2)
    session.unsteer()
    session.break_at(0, tokens=3)
    run.resume()
    assert (run.pause.layer, run.pause.token_step) == (0, 3)
    session.steer(1, 2 * vector)
    return session, run


def test_configuration_changed_at_pauses_moves_with_the_run():
    """The replay takes each configuration on at the pause where it was changed, so the moved run stands at the
    same pause with the same activations and configuration, and finishes as the unmoved one."""
    source, target, alone = (Engine(device="cpu", deterministic=True) for _ in range(3))
    try:
        vector = torch.full((64,), 0.05)
        session, run = reconfigured_run(source, vector)
        unmoved, twin = reconfigured_run(alone, vector)
        dj.load("tiny-llama", backend=target)
        moved = target.import_session("tiny-llama", source.export_session(session.id))
        assert target.run_snapshot(moved)["pause"] == run.pause.info
        assert torch.equal(target.activation(moved), twin.pause.activation)
        here, there = target.describe_session(moved), source.describe_session(session.id)
        assert here["breakpoints"] == there["breakpoints"] and here["steering"] == there["steering"]
        finish_alike(target, moved, run, twin)
    finally:
        for engine in (source, target, alone):
            engine.shutdown()


def kv_edited_run(engine: Engine):
    """A paused run whose KV was written at its first pause (a key zeroed) and at the one it stands at (a value)."""
    session = dj.load("tiny-llama", backend=engine).session()
    session.generate("Hello, world", 4)
    session.break_at(1, tokens=1)
    session.break_at(2, tokens=2)
    run = session.generate(" and then", 5, fresh=False, keep_logits=True)
    keys, _ = run.pause.kv(0)
    run.pause.edit_kv(0, [0], keys=torch.zeros_like(keys[:, :1]))
    run.resume()
    assert (run.pause.layer, run.pause.token_step) == (2, 2)
    _, values = run.pause.kv(1)
    run.pause.edit_kv(1, [1], values=torch.zeros_like(values[:, :1]))
    return session, run


def test_kv_writes_made_at_pauses_move_with_the_run():
    engines = [Engine(device="cpu", deterministic=True) for _ in range(3)]
    source, target, alone = engines
    try:
        session, run = kv_edited_run(source)
        _, twin = kv_edited_run(alone)
        dj.load("tiny-llama", backend=target)
        moved = target.import_session("tiny-llama", source.export_session(session.id))
        assert torch.equal(target.kv(moved, 1)["values"], twin.pause.kv(1)[1])  # the write at this pause, too
        assert torch.equal(target.kv(moved, 0)["keys"], twin.pause.kv(0)[0])
        finish_alike(target, moved, run, twin)
    finally:
        for engine in engines:
            engine.shutdown()


def test_migrate_on_a_single_engine_says_it_needs_a_cluster():
    engine = Engine(device="cpu", deterministic=True)
    try:
        with dj.load("tiny-llama", backend=engine).session() as session:
            with pytest.raises(InvalidArgumentError, match="cluster"):
                session.migrate()
    finally:
        engine.shutdown()


# a local Ray cluster -----------------------------------------------------------------------------------------
ENGINES = 3
SESSION_TOKENS = 64  # placement counts a session as 64 KiB of tiny-llama's KV (1 KiB a token)
BUDGET = int(2.5 * 1024 * SESSION_TOKENS)  # so two sessions fit an engine, a third does not


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from djinn_kernel.cluster import connect_cluster

    backend = connect_cluster(
        engines=ENGINES,
        resource="djinn_gpu",
        engine_options={"device": "cpu", "deterministic": True, "gpu_memory": BUDGET, "host_memory": "64MiB"},
        session_tokens=SESSION_TOKENS,
        rebalance_s=None,  # by hand only: a timer could move the other tests' sessions under them
        ray_options={"num_cpus": 2, "resources": {"djinn_gpu": ENGINES}, "configure_logging": False},
        start_timeout=120,
    )
    yield backend
    backend.shutdown()
    assert not ray.is_initialized()


def where(cluster) -> dict[int, str]:
    """Each live session's engine, as the cluster's status reports it."""
    return {sid: e["name"] for e in cluster.status()["engines"] for sid in e["sessions"]}


def test_placement_on_the_cluster_follows_the_policy(cluster):
    """Runs first, on engines holding nothing: each engine takes two sessions, then the model loads on the next."""
    model = dj.load("tiny-llama", backend=cluster)
    sessions = [model.session() for _ in range(7)]
    try:
        placed = where(cluster)
        assert [placed[s.id] for s in sessions] == ["gpu0", "gpu0", "gpu1", "gpu1", "gpu2", "gpu2", "gpu0"]
        status = cluster.status()
        assert [e["models"] for e in status["engines"]] == [["tiny-llama"]] * ENGINES
        assert [m["engines"] for m in status["models"]] == [["gpu0", "gpu1", "gpu2"]]
        described = {s["id"]: s for s in status["sessions"]}
        assert all(described[s.id]["engine"] == placed[s.id] and described[s.id]["state"] == "idle" for s in sessions)
        run = sessions[3].generate("Hello", 4)  # a routed call answers with the cluster's session id
        assert run.finished and sessions[3].status()["id"] == sessions[3].id
        assert cluster.run_snapshot(sessions[3].id)["session_id"] == sessions[3].id
    finally:
        for s in sessions:
            s.close()
    assert where(cluster) == {}


def test_a_migrated_session_continues_bitwise_as_an_unmigrated_one(cluster):
    model = dj.load("tiny-llama", backend=cluster)
    vector = torch.full((model.hidden_size,), 0.05)
    runs = {}
    for name in ("stay", "move"):
        with model.session() as session:
            session.steer(1, vector)
            bp = session.break_at(2, tokens=1)
            session.generate("Hello, world", 6).finish()
            source = where(cluster)[session.id]
            if name == "move":
                target = {"gpu0": "gpu1"}.get(source, "gpu0")
                info = session.migrate(engine=target)
                assert (info["from"], info["to"], info["id"]) == (source, target, session.id)
                assert info["history_tokens"] > 6 and info["bytes"] > 0
                assert where(cluster)[session.id] == target
                assert session.breakpoints[0]["id"] == bp and session.breakpoints[0]["hits"] == 1
                with pytest.raises(InvalidArgumentError, match="stayed on " + source):
                    session.run.logits  # the last run stayed behind
            run = session.generate(" and then", 5, fresh=False, keep_logits=True)
            assert run.paused and run.pause.layer == 2 and run.pause.token_step == 1
            activation = run.pause.activation
            run.finish()
            runs[name] = (run.id, run.tokens, run.logits, activation)
    (stay_id, stay_tokens, stay_logits, stay_act), (move_id, move_tokens, move_logits, move_act) = runs.values()
    assert move_id == stay_id == 2 and move_tokens == stay_tokens
    assert torch.equal(move_logits, stay_logits) and torch.equal(move_act, stay_act)


def test_a_session_migrated_mid_pause_finishes_as_an_unmigrated_run(cluster):
    """Through the cluster: a session paused at its third pause (edits at two, a step at one) moves to another
    engine, stands at the same pause there, gets steering there and moves back, and finishes with the tokens and
    logits of a run that stayed."""
    dj.load("tiny-llama", backend=cluster)
    vector = torch.full((64,), 0.05)
    session, run = paused_run(cluster, vector)
    stay, twin = paused_run(cluster, vector)
    try:
        before, shown = where(cluster)[session.id], run.pause.activation
        target = {"gpu0": "gpu1"}.get(before, "gpu0")
        info = session.migrate(engine=target)
        assert (info["from"], info["to"], info["paused_run"]) == (before, target, run.id)
        assert where(cluster)[session.id] == target and session.status()["state"] == "paused"
        assert torch.equal(run.pause.activation, shown) and torch.equal(run.pause.original, twin.pause.original)
        session.steer(3, vector)  # changed at the pause it stands at: moves back with it
        stay.steer(3, vector)
        assert session.migrate(engine=before)["paused_run"] == run.id and where(cluster)[session.id] == before
        run.finish()
        twin.finish()
        assert run.tokens == twin.tokens and torch.equal(run.logits, twin.logits)
        assert session.status()["history_tokens"] == stay.status()["history_tokens"]
        with pytest.raises(InvalidArgumentError, match="gpu7"):
            session.migrate(engine="gpu7")
    finally:
        session.close()
        stay.close()


def test_sessions_leave_an_engine_over_its_budget_for_one_with_room_exactly(cluster):
    """Three sessions of ~64 tokens (64 KiB each: short prompts, 60 new tokens, so that a run's reservation fits
    the budget) on one engine of a 160 KiB budget: one rebalancing pass moves what is over to the emptier engines,
    and every session goes on as it would have where it was (twins run afresh on the cluster give the reference:
    engines in Ray workers and this process differ in float32 rounding)."""
    model = dj.load("tiny-llama", backend=cluster)
    prompts = ["Hello", "Hi there", "Good day"]
    sessions = [model.session() for _ in prompts]
    try:
        for session in sessions:
            session.migrate(engine="gpu0")
        for session, text in zip(sessions, prompts):
            session.generate(text, 60)
        held = sum(s["memory"]["gpu_bytes"] + s["memory"]["host_bytes"] for s in cluster.sessions()
                   if s["id"] in {x.id for x in sessions})
        assert held > BUDGET, "the three sessions do not put gpu0 over its budget"
        moved = cluster.rebalance()
        assert moved and all(m["from"] == "gpu0" and m["to"] != "gpu0" for m in moved)
        assert cluster.rebalance() == [], "one pass relieved it"
        placed = where(cluster)
        assert sum(placed[s.id] == "gpu0" for s in sessions) == len(sessions) - len(moved)
        for session, text in zip(sessions, prompts):
            after = session.generate(" more", 4, fresh=False, keep_logits=True)
            with model.session() as twin:
                twin.generate(text, 60)
                expected = twin.generate(" more", 4, fresh=False, keep_logits=True)
                assert after.tokens == expected.tokens and torch.equal(after.logits, expected.logits)
    finally:
        for session in sessions:
            session.close()


def test_the_daemon_serves_the_cluster_backend_as_an_engine(cluster):
    """The daemon calls its engine's methods by name and binds the wire's arguments to their signatures: the
    cluster backend passes unchanged (what `djinn serve --ray` puts behind the socket: tests/test_cluster_daemon.py)."""
    from djinn_kernel.daemon import Client, Daemon, Security

    daemon = Daemon(cluster, Security(b"c" * 64), [])
    mine, other = Client("client-1"), Client("client-2")
    try:
        dj.load("tiny-llama", backend=cluster)
        sid = daemon._dispatch(mine, "open_session", {"model_id": "tiny-llama"})
        snapshot = daemon._dispatch(mine, "generate", {"sid": sid, "prompt": "Hello", "max_new_tokens": 3})
        assert snapshot["session_id"] == sid and snapshot["state"] == "finished"
        with pytest.raises(InvalidArgumentError, match="generate: missing a required argument: 'prompt'"):
            daemon._dispatch(mine, "generate", {"sid": sid})  # bound to the engine's signature, as for an Engine
        with pytest.raises(dj.SessionClosedError):
            daemon._dispatch(other, "describe_session", {"sid": sid})  # another client's session
        status = daemon._dispatch(other, "status", {})
        assert {s["id"]: s["mine"] for s in status["sessions"]}[sid] is False and len(status["engines"]) == ENGINES
        assert daemon.describe()["device"] == f"ray ({ENGINES} engines)"
        daemon._dispatch(mine, "close_session", {"sid": sid})
    finally:
        daemon._pool.shutdown()
        daemon._ctx.term()


def test_a_dead_engine_fails_only_its_own_sessions_and_ray_restarts_it(cluster):
    """Last: it kills an engine's process. Its sessions raise EngineLostError naming it; the others go on,
    unchanged; Ray restarts the engine, which comes back empty and takes sessions again. Removed for good
    (no restart), it stays dead and new sessions go to the engines left."""
    ray = pytest.importorskip("ray")
    model = dj.load("tiny-llama", backend=cluster)
    kept, doomed = model.session(), model.session()
    kept.generate("Hello, world", 4)
    doomed.generate("Hello, world", 4)
    if where(cluster)[doomed.id] == where(cluster)[kept.id]:
        doomed.migrate()
    kept_engine, doomed_engine = where(cluster)[kept.id], where(cluster)[doomed.id]
    assert kept_engine != doomed_engine
    twin = kept.fork()  # on kept's engine: what kept must still give after the kill
    expected = twin.generate(" more", 4, fresh=False, keep_logits=True)

    engines = {e["name"]: e for e in cluster.status()["engines"]}
    old_pid = engines[doomed_engine]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    with pytest.raises(EngineLostError, match=f"engine {doomed_engine} .* died; its sessions \\[{doomed.id}\\]") as lost:
        doomed.generate(" more", 4, fresh=False)
    assert isinstance(lost.value, SessionLostError)
    with pytest.raises(EngineLostError, match=f"session {doomed.id} was on {doomed_engine}, which died"):
        doomed.status()
    after = kept.generate(" more", 4, fresh=False, keep_logits=True)
    assert after.tokens == expected.tokens and torch.equal(after.logits, expected.logits)

    cluster.wait_for_restarts(timeout=120)
    status = cluster.status()
    back = {e["name"]: e for e in status["engines"]}[doomed_engine]
    assert back["alive"] and back["pid"] not in (None, old_pid) and back["sessions"] == [] and back["models"] == []
    assert {s["id"]: s["state"] for s in status["sessions"]}[doomed.id] == "lost"
    doomed.close()  # a lost session closes without error, and is then forgotten
    assert doomed.id not in {s["id"] for s in cluster.sessions()}
    moved = kept.migrate(engine=doomed_engine)  # the restarted engine loads the model and takes the session
    assert moved["to"] == doomed_engine and where(cluster)[kept.id] == doomed_engine
    again = kept.generate(" more", 4, fresh=False, keep_logits=True)
    assert again.tokens == twin.generate(" more", 4, fresh=False, keep_logits=True).tokens

    ray.kill(cluster._engines[int(doomed_engine[3:])].actor, no_restart=True)
    # Whichever call finds the death first tells it ("engine gpuN (pid ...) died; its sessions [...]"), later ones
    # the session's own line ("session S was on gpuN, which died: its sessions [...]"): Ray's kill is asynchronous.
    with pytest.raises(EngineLostError, match=f"{doomed_engine}\\b.* died[;:] its sessions \\[{kept.id}\\]"):
        kept.generate(" more", 4, fresh=False)
    dead = {e["name"]: e for e in cluster.status()["engines"]}[doomed_engine]
    assert not dead["alive"] and "will not restart it" in dead["error"] and dead["sessions"] == []
    with model.session() as fresh:  # new sessions go to the engines left
        assert where(cluster)[fresh.id] != doomed_engine
        assert fresh.generate("Hello, world", 4).finished
    with pytest.raises(EngineLostError, match=doomed_engine):
        twin.migrate(engine=doomed_engine)
    twin.close()
    kept.close()
