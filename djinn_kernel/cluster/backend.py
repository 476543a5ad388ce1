"""A backend over a Ray cluster of engines, one per GPU: the ``Engine``'s methods, each session's routed to the
engine that holds it, so ``djinn_kernel.api`` (``Model``, ``Session``, ``Run``) works on it unchanged.

Ids: a session has one id cluster-wide (what the user and the API hold); the backend maps it to (engine, the
engine's own id) and rewrites ids in what comes back (``describe_session``'s ``id``, a run snapshot's
``session_id``). Models keep their names: a model is loaded, under its name, on each engine placement sends one of
its sessions to (placement.py states the policy).

Invariants:
- Mapping state (sessions, engines, models) is read and written under ``_lock`` only; no Ray call is made while
  holding it (a call may block for a whole run). ``_place_lock`` serialises placements (open, fork, migrate
  target), so two sessions opened at once are not both placed on the same view of the engines' loads.
- A session call counts itself in flight (``_Placed.calls``) for its duration. A migration starts only with none
  in flight and refuses new calls until it is done, so no call reaches the source engine after the state left it.
- An engine is identified by its process (``_Engine.pid``). When a call to it fails because the actor went away
  (Ray's ``ActorDiedError`` or ``ActorUnavailableError``), the backend asks the actor for its pid: the same pid is
  a call lost in transit (an error, nothing lost); another pid, or none, is a death. A death is handled once per
  process: every session it held is marked lost with a message naming the engine and the sessions, and those
  sessions raise ``EngineLostError`` on any use but ``close``. Ray restarts the actor (``max_restarts``): the
  engine comes back empty under the same name and takes new sessions; out of restarts, it stays dead. Sessions
  on other engines never see it: a failure is confined to its engine's sessions.
- Errors an engine raises on purpose reach the caller as the same ``DjinnError`` subclass (unwrapped from Ray's
  ``RayTaskError``).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..split import host_id as split_id, not_movable, stage_id
from ..errors import (
    DjinnError,
    EngineLostError,
    InvalidArgumentError,
    ModelNotFoundError,
    SessionBusyError,
    SessionClosedError,
)
from .placement import EngineLoad, NoEngineError, SessionLoad, place, rebalance, split_pair
from .stage import ActorStage
from .worker import EngineWorker

INSTALL_HINT = "pip install 'djinn-kernel[ray]'"
DEFAULT_SESSION_TOKENS = 4096  # what placement counts one session to take: its KV for this many positions


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DjinnError(f"serving on a Ray cluster needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@dataclass
class _Engine:
    index: int
    actor: Any
    pid: int | None = None
    node: str | None = None
    device: str | None = None
    lost: str | None = None  # why it is dead, while it is (Ray may be restarting it: ``back``)
    back: Any = None  # a describe call to the restarting actor, answered once it is up again
    deaths: dict[int, str] = field(default_factory=dict)  # by the pid that died: what its sessions were told

    @property
    def name(self) -> str:
        return f"gpu{self.index}"


@dataclass
class _Placed:
    """Where one cluster session lives."""

    engine: _Engine
    local: int  # the session's id on its engine
    model: str
    owner: str
    calls: int = 0  # session calls in flight
    moving: bool = False
    moved_from: str | None = None  # set by a migration, cleared by the next run: the last run stayed there


@dataclass
class _ModelSpec:
    """How to load a model on another engine: by name (``load_model``) or from code (``register_model``)."""

    name: str
    dtype: str = "auto"
    registered: tuple[Any, ...] | None = None  # (model, tokenizer, eos_ids) of register_model
    info: dict[str, Any] = field(default_factory=dict)
    host: int | None = None  # a split model's host engine (load_split): its sessions open there and stay


# Session operations routed as they are: the engine's own signature, the session id first.
_SESSION_OPS = (
    "describe_session", "add_breakpoint", "remove_breakpoint", "add_steering", "remove_steering", "add_recording",
    "remove_recording", "recorded", "attach_sae", "detach_sae", "generate", "rewind", "resume", "cancel", "wait",
    "run_snapshot", "run_logits", "activation", "edit", "reset_edits", "kv", "attention", "features", "edit_kv",
    "logit_lens", "page_out", "page_in", "io_wait", "compute",
)
_SNAPSHOT_OPS = frozenset({"generate", "resume", "cancel", "wait", "run_snapshot"})
_DESCRIBE_OPS = frozenset({"describe_session", "rewind"})
_LAST_RUN_OPS = frozenset({"run_logits", "recorded"})
_MODEL_OPS = ("module_paths", "token_strings", "tokenize")


class ClusterBackend:
    """The engine's methods over several engines (Ray actors, one per GPU); see the module docstring."""

    def __init__(self, ray: Any, actors: list[Any], *, session_tokens: int = DEFAULT_SESSION_TOKENS,
                 owns_ray: bool = False, start_timeout: float = 300.0, rebalance_s: float | None = None) -> None:
        """``actors``: ``EngineWorker`` actors, in engine order, waited for up to ``start_timeout`` seconds (and
        as long for one that Ray restarts, at the call that finds it gone). ``session_tokens``: placement counts
        a session as taking the KV of this many positions. ``owns_ray``: ``shutdown`` also stops Ray (it was
        started for this backend). ``rebalance_s``: a ``rebalance`` pass every this many seconds, on a thread of
        its own (None: by hand only)."""
        if isinstance(session_tokens, bool) or not isinstance(session_tokens, int) or session_tokens < 1:
            raise InvalidArgumentError(f"session_tokens must be a positive integer, not {session_tokens!r}")
        refusal = _bad_interval(rebalance_s)
        if refusal:
            raise InvalidArgumentError(refusal)
        self._ray = ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

        self._died, self._gone, self._task_error = ActorDiedError, (ActorDiedError, ActorUnavailableError), RayTaskError
        self._timeout_error, self._start_timeout = GetTimeoutError, start_timeout
        self.session_tokens = session_tokens
        self._owns_ray = owns_ray
        self._engines = [_Engine(i, actor) for i, actor in enumerate(actors)]
        try:
            described = ray.get([a.describe.remote() for a in actors], timeout=start_timeout)
        except GetTimeoutError:
            for actor in actors:
                ray.kill(actor)
            raise DjinnError(
                f"{len(actors)} engines did not start within {start_timeout:g} s: the cluster may lack the resources "
                f"for them (each takes one GPU or one unit of the resource standing for one; see ray status)"
            ) from None
        for engine, info in zip(self._engines, described):
            engine.pid, engine.node, engine.device = info["pid"], info["node"], info["device"]
        self.device = f"ray ({len(actors)} engines)"  # what the daemon reports as its device
        self._sessions: dict[int, _Placed] = {}
        self._lost: dict[int, str] = {}  # sessions of dead engines: the message their every use raises
        self._models: dict[str, _ModelSpec] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._place_lock = threading.Lock()
        self.closed = False
        self._stop = threading.Event()
        if rebalance_s is not None:
            threading.Thread(target=self._rebalance_every, args=(rebalance_s,), name="djinn-rebalance",
                             daemon=True).start()

    # calls to engines ------------------------------------------------------------------------------------
    def _get(self, engine: _Engine, ref: Any) -> Any:
        """The result of a call made to ``engine``: its own DjinnError re-raised as is, the actor's going away
        turned into ``EngineLostError`` (``_failed``)."""
        pid = engine.pid  # the process the call went to
        try:
            return self._ray.get(ref)
        except self._gone as exc:
            raise self._failed(engine, pid, exc) from None
        except self._task_error as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DjinnError):
                raise cause from None
            raise exc.as_instanceof_cause() from None

    def _call(self, engine: _Engine, op: str, *args: Any, **kwargs: Any) -> Any:
        if engine.lost is not None:
            raise EngineLostError(engine.lost)
        return self._get(engine, engine.actor.call.remote(op, *args, **kwargs))

    def _failed(self, engine: _Engine, pid: int | None, exc: BaseException) -> DjinnError:
        """A call to process ``pid`` of ``engine`` found the actor gone: a death (handled once per process) or a
        call lost in transit (the same process answers again)."""
        if engine.pid != pid:  # another call already found this process dead
            return self._told(engine, pid)
        info = None
        if not isinstance(exc, self._died):  # restarting, or unreachable for a moment: who answers now?
            try:
                info = self._ray.get(engine.actor.describe.remote(), timeout=self._start_timeout)
            except (*self._gone, self._timeout_error):
                pass
        with self._lock:
            if engine.pid != pid:
                return self._told(engine, pid)
            if info is not None and info["pid"] == pid:
                return DjinnError(
                    f"engine {engine.name} did not answer a call ({type(exc).__name__}), which may or may not have "
                    f"run; the engine and its sessions are intact: check the session's state and call again"
                )
            lost = sorted(gid for gid, p in self._sessions.items() if p.engine is engine)
            death = (
                f"engine {engine.name} (pid {pid}, {engine.device}) died; its sessions {lost or '(none)'} were lost "
                f"with their KV, runs and breakpoints. Close them and open new sessions"
            )
            for gid in lost:
                self._lost[gid] = f"session {gid} was on {engine.name}, which died: " + death.split("; ", 1)[1]
                del self._sessions[gid]
            engine.deaths[pid] = death
            engine.pid = None
            if info is not None:  # Ray has restarted it already: up again, empty
                self._revived(engine, info)
            elif isinstance(exc, self._died):
                engine.lost = death + "; Ray will not restart it (its restarts are used up, or it was removed)"
            else:
                engine.lost = death + "; Ray is restarting it"
                engine.back = engine.actor.describe.remote()
            return EngineLostError(death)

    @staticmethod
    def _told(engine: _Engine, pid: int | None) -> EngineLostError:
        """What the sessions of ``engine``'s process ``pid`` were told when it died."""
        return EngineLostError(engine.deaths.get(pid, f"engine {engine.name} restarted during this call"))

    def _revived(self, engine: _Engine, info: dict[str, Any]) -> None:
        """``engine``'s actor answers again from a new process (call with ``_lock`` held)."""
        engine.pid, engine.node, engine.device = info["pid"], info["node"], info["device"]
        engine.lost, engine.back = None, None

    def wait_for_restarts(self, timeout: float = 0.0) -> list[str]:
        """Engines that Ray was restarting and that answer again within ``timeout`` seconds (0: those up by now),
        by name; they take new sessions from now on. Placement and ``status`` look without waiting."""
        deadline = time.monotonic() + timeout
        revived: list[str] = []
        while True:
            with self._lock:
                pending = {e.back: e for e in self._engines if e.back is not None}
            if not pending:
                return revived
            left = max(0.0, deadline - time.monotonic())
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                return revived
            engine = pending[ready[0]]
            try:
                info, again = self._ray.get(ready[0]), None
            except self._died:
                info, again = None, None
            except self._gone:  # asked as it went down: ask the restarted process again
                info, again = None, engine.actor.describe.remote()
            with self._lock:
                if info is not None:
                    self._revived(engine, info)
                    revived.append(engine.name)
                else:
                    engine.back = again
                    if again is None:
                        engine.lost = engine.lost.replace("Ray is restarting it", "Ray did not restart it")

    def _live(self) -> list[_Engine]:
        self.wait_for_restarts()
        with self._lock:
            return [e for e in self._engines if e.lost is None]

    def _load_infos(self, engines: list[_Engine]) -> list[tuple[_Engine, dict[str, Any] | None]]:
        """Each engine's ``EngineWorker.load()``, asked of all at once; None for one that died or did not answer."""
        refs = [(e, e.actor.load.remote()) for e in engines]
        infos = []
        for engine, ref in refs:
            try:
                infos.append((engine, self._get(engine, ref)))
            except DjinnError:
                infos.append((engine, None))
        return infos

    def _loads(self, engines: list[_Engine]) -> list[EngineLoad]:
        """Each live engine's load, from the engines themselves (one that died meanwhile is marked so: no session
        goes there now)."""
        return [
            EngineLoad(engine.index, 0, alive=False) if info is None else
            EngineLoad(engine.index, info["budget"], tuple(info["sessions"].values()), frozenset(info["models"]),
                       weights_in_budget=info["weights_in_budget"])
            for engine, info in self._load_infos(engines)
        ]

    # sessions: routing -------------------------------------------------------------------------------------
    def _enter(self, sid: object) -> _Placed:
        with self._lock:
            if isinstance(sid, int) and sid in self._lost:
                raise EngineLostError(self._lost[sid])
            placed = self._sessions.get(sid) if isinstance(sid, int) and not isinstance(sid, bool) else None
            if placed is None:
                raise SessionClosedError(f"session {sid!r} does not exist or was closed; open a new one with model.session()")
            if placed.moving:
                raise SessionBusyError(f"session {sid} is migrating to another engine; use it once that returns")
            placed.calls += 1
            return placed

    def _leave(self, placed: _Placed) -> None:
        with self._lock:
            placed.calls -= 1

    def _routed(self, op: str, sid: int, *args: Any, **kwargs: Any) -> Any:
        placed = self._enter(sid)
        try:
            if op in _LAST_RUN_OPS and placed.moved_from is not None:
                raise InvalidArgumentError(
                    f"session {sid}'s last run stayed on {placed.moved_from} when the session migrated: its logits "
                    f"and recordings were not carried (read them before session.migrate())"
                )
            if op == "generate":
                placed.moved_from = None
            result = self._call(placed.engine, op, placed.local, *args, **kwargs)
        finally:
            self._leave(placed)
        return self._global(op, sid, result)

    @staticmethod
    def _global(op: str, sid: int, result: Any) -> Any:
        """``result`` with the engine's session id replaced by the cluster's."""
        if op in _SNAPSHOT_OPS and isinstance(result, dict):
            return {**result, "session_id": sid}
        if op in _DESCRIBE_OPS and isinstance(result, dict):
            run = result.get("run")
            return {**result, "id": sid, "run": run if run is None else {**run, "session_id": sid}}
        return result

    # models ----------------------------------------------------------------------------------------------
    def load_model(self, name: str, dtype: str = "auto") -> dict[str, object]:
        """Load ``name`` on one engine (placement's choice, see placement.py) unless one has it already; other
        engines load it when placement sends one of its sessions there."""
        return self._first_load(name, _ModelSpec(name, dtype))

    def register_model(self, name: str, model: Any, tokenizer: object = None,
                       eos_ids: tuple[int, ...] = ()) -> dict[str, object]:
        """Serve a model built in code: it is sent to (pickled for) each engine that needs it."""
        with self._lock:
            if name in self._models:
                raise InvalidArgumentError(f"a model named {name!r} is already loaded; pick another name")
        return self._first_load(name, _ModelSpec(name, registered=(model, tokenizer, tuple(eos_ids))))

    def _first_load(self, name: str, spec: _ModelSpec) -> dict[str, object]:
        with self._place_lock:
            live = self._live()
            if not live:
                raise self._no_engine()
            loads = self._loads(live)
            holders = [load.index for load in loads if load.alive and name in load.models]
            if holders:  # the engine checks the dtype asked against the one it loaded
                return self._call(self._engines[holders[0]], "load_model", name, spec.dtype)
            info = self._load_on(self._engines[place(name, loads, need=0).engine], spec)
            with self._lock:
                spec.info = info
                self._models[name] = spec
            return info

    def _load_on(self, engine: _Engine, spec: _ModelSpec) -> dict[str, object]:
        if spec.registered is not None:
            model, tokenizer, eos_ids = spec.registered
            return self._call(engine, "register_model", spec.name, model, tokenizer, eos_ids)
        return self._call(engine, "load_model", spec.name, spec.dtype)

    def _spec(self, model_id: str) -> _ModelSpec:
        with self._lock:
            spec = self._models.get(model_id)
        if spec is None:
            raise ModelNotFoundError(f"model {model_id!r} is not loaded; load it first (djinn_kernel.load({model_id!r}))")
        return spec

    def models(self) -> list[dict[str, object]]:
        """Every model loaded on the cluster, once each, with ``engines``: the engines it is resident on."""
        live = self._live()
        loads = self._loads(live)
        with self._lock:
            specs = list(self._models.values())
        return [{**spec.info, "engines": [f"gpu{load.index}" for load in loads if load.alive and spec.name in load.models]}
                for spec in specs]

    def _model_call(self, op: str, model_id: str, *args: Any) -> Any:
        self._spec(model_id)
        loads = self._loads(self._live())
        holders = [self._engines[load.index] for load in loads if load.alive and model_id in load.models]
        if not holders:
            raise ModelNotFoundError(f"model {model_id!r} is loaded on no engine that is alive; load it again")
        return self._call(holders[0], op, model_id, *args)

    # sessions ---------------------------------------------------------------------------------------------
    def open_session(self, model_id: str, owner: str = "local") -> int:
        """A new session on the engine placement picks (placement.py), loading the model there if needed."""
        spec = self._spec(model_id)
        with self._place_lock:
            live = self._live()
            if not live:
                raise self._no_engine()
            chosen = self._place(spec, self._loads(live))
            local = self._call(chosen, "open_session", model_id, owner)
            with self._lock:
                sid = next(self._ids)
                self._sessions[sid] = _Placed(chosen, local, model_id, owner)
            return sid

    def load_split(self, name: str, split_at: int, dtype: str = "auto") -> dict[str, object]:
        """Load ``name`` split by layer over two engines (split.py): its first ``split_at`` decoder layers, their
        weights and KV, on one (the stage), the rest and the sessions on another (the host); the two with the most
        room (placement.split_pair). Sessions of the returned model open on the host and stay there."""
        return self._split(split_id(name, split_at), split_at, dtype, ("serve_stage", name, split_at, dtype),
                           lambda stage: ("serve_split", name, split_at, stage, dtype))

    def register_split(self, name: str, model: Any, split_at: int, tokenizer: object = None,
                       eos_ids: tuple[int, ...] = (), stage_model: Any = None) -> dict[str, object]:
        """``load_split`` for a model built in code (pickled to both engines, as ``register_model``'s is);
        ``stage_model``: what the stage gets instead (e.g. a recipe that builds only the first layers there)."""
        layers, model_id = range(0, split_at), split_id(name, split_at)
        return self._split(model_id, split_at, "auto", ("register_stage", stage_id(name, split_at),
                                              model if stage_model is None else stage_model, layers),
                           lambda stage: ("register_split", model_id, model, layers, stage, tokenizer, tuple(eos_ids)))

    def _split(self, model_id: str, split_at: int, dtype: str, on_stage: tuple,
               on_host: Callable[[ActorStage], tuple]) -> dict[str, object]:
        """Load one side of a split on each of the two engines with the most room: ``on_stage`` is the stage's
        call, ``on_host(stage)`` the host's, given the stage it calls."""
        with self._place_lock:
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id].info
            try:
                host, stage = (self._engines[i] for i in split_pair(self._loads(self._live()), need=0))
            except NoEngineError as exc:
                raise InvalidArgumentError(f"{exc}: start the cluster with more engines (--engines)") from None
            staged = self._call(stage, *on_stage)
            info = self._call(host, *on_host(ActorStage(stage.actor, staged["id"], stage.name)))
            info = {**info, "split": {"at": split_at, "host": host.name, "stage": stage.name,
                                      "stage_weight_bytes": staged["weight_bytes"]}}
            with self._lock:
                self._models[model_id] = _ModelSpec(model_id, dtype, info=info, host=host.index)
            return info

    def _place(self, spec: _ModelSpec, loads: list[EngineLoad]) -> _Engine:
        """The engine for a new session of ``spec``'s model, with the model loaded there."""
        if spec.host is not None:
            engine = self._engines[spec.host]
            if engine.lost is not None:
                raise EngineLostError(f"{spec.name} is split with its sessions on {engine.name}, which is gone "
                                      f"({engine.lost}); load it again")
            return engine
        per_token = int(spec.info.get("kv_bytes_per_token") or 0)
        try:
            placement = place(spec.name, loads, need=per_token * self.session_tokens,
                              weight_bytes=int(spec.info.get("weight_bytes") or 0))
        except NoEngineError:
            raise self._no_engine() from None
        engine = self._engines[placement.engine]
        if placement.load:
            self._load_on(engine, spec)
        return engine

    def _no_engine(self) -> EngineLostError:
        with self._lock:
            why = "; ".join(e.lost for e in self._engines if e.lost)
        return EngineLostError(f"every engine of the cluster has died ({why}); start it again")

    def close_session(self, sid: int) -> None:
        """Close the session on its engine; a session lost with its engine is just forgotten."""
        with self._lock:
            if isinstance(sid, int) and self._lost.pop(sid, None) is not None:
                return None
        placed = self._enter(sid)
        try:
            self._call(placed.engine, "close_session", placed.local)
        except EngineLostError:
            pass  # its engine died meanwhile: nothing is left to close
        finally:
            self._leave(placed)
            with self._lock:
                self._sessions.pop(sid, None)
                self._lost.pop(sid, None)
        return None

    def fork(self, sid: int) -> int:
        """A copy of the session on the same engine (its KV stays where it is)."""
        placed = self._enter(sid)
        try:
            local = self._call(placed.engine, "fork", placed.local)
        finally:
            self._leave(placed)
        with self._lock:
            new = next(self._ids)
            self._sessions[new] = _Placed(placed.engine, local, placed.model, placed.owner)
        return new

    def sessions(self, owner: str | None = None) -> list[dict[str, object]]:
        """Every session on the cluster, each with ``engine``; one lost with its engine as ``state: lost``."""
        with self._lock:
            placed = {(p.engine.index, p.local): gid for gid, p in self._sessions.items()}
            lost = [{"id": gid, "owner": None, "model": None, "state": "lost", "memory": {}, "error": why}
                    for gid, why in self._lost.items()]
        out = []
        for engine in self._live():
            try:
                listed = self._call(engine, "sessions", owner)
            except EngineLostError:
                continue
            for s in listed:
                gid = placed.get((engine.index, s["id"]))
                if gid is not None:  # else opened or closed meanwhile
                    out.append({**self._global("describe_session", gid, s), "engine": engine.name})
        return sorted(out, key=lambda s: s["id"]) + ([] if owner is not None else lost)

    # migration -------------------------------------------------------------------------------------------
    def migrate(self, sid: int, engine: int | str | None = None) -> dict[str, object]:
        """Move an idle or paused session to another engine, exactly: its KV and history, breakpoints, steering,
        recordings and SAEs, and a paused run, which runs again there to the same pause (migration.py). The state goes from the source engine to the target through Ray's
        object store. ``engine``: an index or a name (``"gpu1"``); None lets placement pick among the others.
        The session keeps its id; on any failure it stays where it was."""
        with self._lock:
            placed = self._enter(sid)
            placed.calls -= 1
            if placed.calls:
                raise SessionBusyError(
                    f"session {sid} has a call in progress (a run?); migrate it once that call has returned"
                )
            placed.moving = True
        try:
            return self._migrate(sid, placed, engine)
        finally:
            with self._lock:
                placed.moving = False

    def _migrate(self, sid: int, placed: _Placed, engine: int | str | None) -> dict[str, object]:
        started = time.monotonic()
        source = placed.engine
        spec = self._spec(placed.model)
        if spec.host is not None:
            raise not_movable(sid, spec.name)
        with self._place_lock:
            target = self._target(engine, source, spec)
            if target is source:
                return {"id": sid, "from": source.name, "to": target.name, "seconds": 0.0}
            # The state stays in the object store: the import below takes it from there, not through this process.
            exported, state = source.actor.export.options(num_returns=2).remote(placed.local)
            try:
                moved = self._get(source, exported)  # the export's own error (a run in progress...) or its size
            except DjinnError:  # the export failed: its other return holds the same error
                self._discard(state)
                raise
            local = self._get(target, target.actor.call.remote("import_session", placed.model, state,
                                                               owner=placed.owner))
        try:
            self._call(source, "close_session", placed.local)
        except EngineLostError:
            pass  # the source died after the state left it: the session lives on, on the target
        with self._lock:
            # An idle session's last run stays behind; a paused one moved along and is the session's run there.
            placed.engine, placed.local = target, local
            placed.moved_from = source.name if moved["paused_run"] is None else None
            self._sessions[sid] = placed
            self._lost.pop(sid, None)
        return {"id": sid, "from": source.name, "to": target.name, **moved, "seconds": time.monotonic() - started}

    def _discard(self, ref: Any) -> None:
        """Read a failed task's other return (the same error, small) so Ray does not report it as unhandled."""
        try:
            self._ray.get(ref)
        except (self._task_error, self._died):
            pass  # the error the caller is raising already

    def _target(self, engine: int | str | None, source: _Engine, spec: _ModelSpec) -> _Engine:
        if engine is None:
            others = [e for e in self._live() if e is not source]
            if not others:
                raise InvalidArgumentError(f"no other engine is alive to migrate to (the session is on {source.name})")
            return self._place(spec, self._loads(others))
        names = {e.name: e for e in self._engines}
        chosen = None
        if isinstance(engine, int) and not isinstance(engine, bool) and 0 <= engine < len(self._engines):
            chosen = self._engines[engine]
        elif isinstance(engine, str):
            chosen = names.get(engine)
        if chosen is None:
            raise InvalidArgumentError(
                f"engine must be an index from 0 to {len(self._engines) - 1} or one of {sorted(names)}, not {engine!r}"
            )
        if chosen.lost is not None:
            raise EngineLostError(chosen.lost)
        if chosen is not source and spec.name not in self._loads([chosen])[0].models:
            self._load_on(chosen, spec)
        return chosen

    # rebalancing -----------------------------------------------------------------------------------------
    def rebalance(self) -> list[dict[str, object]]:
        """One pass of placement.rebalance: sessions that can move (idle or paused, no call in flight) leave an
        engine whose sessions hold more than its budget for one with room (``migrate``, exact). The moves made;
        a session that became busy meanwhile is skipped. ``connect_cluster(rebalance_s=...)`` runs it on a timer."""
        engines, sessions = [], []
        for engine, info in self._load_infos(self._live()):
            if info is None:
                continue  # died or did not answer: it neither gives nor takes sessions in this pass
            engines.append(EngineLoad(engine.index, info["budget"]))
            with self._lock:
                mine = {p.local: (gid, p) for gid, p in self._sessions.items() if p.engine is engine}
            for local, held in info["held"].items():
                if local in mine:
                    gid, placed = mine[local]
                    movable = (info["states"][local] in ("idle", "paused", "paged") and not placed.calls
                               and self._spec(placed.model).host is None)
                    sessions.append(SessionLoad(gid, engine.index, held, movable))
        moved = []
        for gid, target in rebalance(engines, sessions):
            try:
                moved.append(self.migrate(gid, engine=target))
            except (SessionBusyError, SessionClosedError, EngineLostError):
                continue  # busy, closed or lost since the loads were read
        return moved

    def _rebalance_every(self, seconds: float) -> None:
        """The timer behind ``rebalance_s``: a pass every ``seconds`` until ``shutdown``."""
        while not self._stop.wait(seconds):
            try:
                self.rebalance()
            except DjinnError:
                continue  # e.g. every engine died: the next pass tries again

    # the cluster -----------------------------------------------------------------------------------------
    def engines(self) -> list[dict[str, object]]:
        """Each engine (GPU): where it runs, whether it is alive, its resident models, its sessions and memory."""
        self.wait_for_restarts()
        with self._lock:
            by_engine = {e.index: sorted(g for g, p in self._sessions.items() if p.engine is e) for e in self._engines}
        out = []
        for engine in self._engines:
            entry: dict[str, object] = {
                "index": engine.index, "name": engine.name, "node": engine.node, "pid": engine.pid,
                "device": engine.device, "alive": engine.lost is None, "error": engine.lost,
                "models": [], "sessions": by_engine[engine.index], "memory": None,
            }
            if engine.lost is None:
                try:
                    status = self._call(engine, "status")
                    entry.update(models=[m["id"] for m in status["models"]], memory=status["memory"])
                except EngineLostError:
                    entry.update(alive=False, error=engine.lost, sessions=[])
            out.append(entry)
        return out

    def status(self) -> dict[str, object]:
        """The cluster: its engines (one per GPU: models resident, sessions, memory), every model and session."""
        engines = self.engines()
        alive = [e for e in engines if e["alive"]]
        return {
            "device": {"type": "cluster", "engines": len(engines), "alive": len(alive)},
            "engines": engines,
            "models": self.models(),
            "sessions": self.sessions(),
        }

    def shutdown(self) -> None:
        """Stop every engine (closing their sessions), and Ray too when it was started for this backend."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        refs = [(e, e.actor.call.remote("shutdown")) for e in self._live()]
        for engine, ref in refs:
            try:
                self._get(engine, ref)
            except DjinnError:
                pass  # a dead engine has nothing left to stop
        for engine in self._engines:
            self._ray.kill(engine.actor)
        if self._owns_ray:
            self._ray.shutdown()

    def __repr__(self) -> str:
        alive = len(self._live())
        return f"<djinn ClusterBackend: {alive}/{len(self._engines)} engines alive, {len(self._sessions)} sessions>"


def _bad_interval(rebalance_s: object) -> str | None:
    """Why ``rebalance_s`` is refused, or None when it is fine (None: no timer)."""
    if rebalance_s is None or (isinstance(rebalance_s, (int, float)) and not isinstance(rebalance_s, bool)
                               and 0 < rebalance_s < float("inf")):
        return None
    return f"rebalance_s must be None or a positive number of seconds, not {rebalance_s!r}"


def _session_op(op: str) -> Any:
    @functools.wraps(getattr(Engine, op))  # the engine's signature and docstring (the daemon binds arguments by it)
    def routed(self: ClusterBackend, sid: int, *args: Any, **kwargs: Any) -> Any:
        return self._routed(op, sid, *args, **kwargs)

    return routed


def _model_op(op: str) -> Any:
    @functools.wraps(getattr(Engine, op))
    def routed(self: ClusterBackend, model_id: str, *args: Any) -> Any:
        return self._model_call(op, model_id, *args)

    return routed


for _op in _SESSION_OPS:
    setattr(ClusterBackend, _op, _session_op(_op))
for _op in _MODEL_OPS:
    setattr(ClusterBackend, _op, _model_op(_op))


def connect_cluster(
    address: str | None = None,
    engines: int | None = None,
    *,
    resource: str = "GPU",
    engine_options: dict[str, Any] | None = None,
    session_tokens: int = DEFAULT_SESSION_TOKENS,
    max_concurrency: int = 64,
    max_restarts: int = 3,
    rebalance_s: float | None = 5.0,
    ray_options: dict[str, Any] | None = None,
    start_timeout: float = 300.0,
) -> ClusterBackend:
    """Join the Ray cluster at ``address`` (``"auto"``: the one this machine is part of), or start a local one
    (None), and start one engine actor per GPU: ``engines`` of them, default as many as the cluster has of
    ``resource``. ``resource``: ``"GPU"`` (each engine takes one GPU), or a custom resource name that stands for
    GPUs (the CPU test cluster). ``engine_options``: each ``Engine``'s keyword arguments, plus ``gpu_memory`` and
    ``host_memory`` (worker.py). ``max_restarts``: how many times Ray restarts an engine whose process died (it
    comes back empty; its sessions are lost). ``rebalance_s``: how often sessions are moved off an engine whose
    sessions hold more than its budget to one with room (``ClusterBackend.rebalance``; None: by hand only).
    ``ray_options``: more arguments for ``ray.init`` when it is called
    here.

    Pass the result as ``backend=`` (``djinn_kernel.load("tiny-llama", backend=cluster)``); ``shutdown()`` stops
    the engines (and Ray, if started here)."""
    ray = import_ray()
    owns = False
    if not ray.is_initialized():
        options = {"include_dashboard": False, "log_to_driver": False, **(ray_options or {})}
        ray.init(address=address, **options)
        owns = address is None
    have = int(ray.cluster_resources().get(resource, 0))
    count = have if engines is None else engines
    refusal, interval = None, _bad_interval(rebalance_s)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        refusal = f"max_restarts must be an integer >= 0, not {max_restarts!r}"
    elif interval:
        refusal = interval
    elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
        refusal = f"the cluster has {have} {resource}; ask for a positive number of engines (one per {resource})"
    elif owns and count > have:  # a local Ray started here gets no more: the engines would wait start_timeout
        refusal = f"{count} engines need {count} {resource}, and the local Ray cluster has {have}"
    if refusal is not None:
        if owns:
            ray.shutdown()
        raise InvalidArgumentError(refusal)
    # num_cpus=0: an engine holds its GPU, not a CPU slot (Ray's default of one CPU per actor would leave engines
    # unscheduled on a machine with fewer cores than GPUs).
    placement = {"num_gpus": 1} if resource == "GPU" else {"resources": {resource: 1}}
    actor_class = ray.remote(EngineWorker).options(
        max_concurrency=max_concurrency, max_restarts=max_restarts, max_task_retries=0, num_cpus=0, **placement
    )
    actors = [actor_class.remote(index, dict(engine_options or {})) for index in range(count)]
    return ClusterBackend(ray, actors, session_tokens=session_tokens, owns_ray=owns, start_timeout=start_timeout,
                          rebalance_s=rebalance_s)
