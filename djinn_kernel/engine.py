"""The engine: models loaded once, sessions that own runs, and runs that pause inside their forward pass.

Threads and ownership:
- A run's forwards run on its session's executor thread (``executor.Worker``: a daemon thread, so a paused run
  never holds up interpreter exit). The run binds itself to that thread (``hooks.bind``) so the shared hooks route activations to it and
  to no other session.
- The driver (the in-process API, or the daemon) calls engine methods from other threads. A session's lock
  serialises its drivers; the ``Handoff`` orders driver and executor (see handoff.py).
- A paused value (``PauseState.current``) is touched only by the driver, and only while the executor is blocked
  in ``Handoff.pause``. When the run resumes the executor takes it back; the driver's ``PauseState`` is stale.
- Session tensors are read or written only inside ``MemoryManager.resident`` (paged in, nothing can page them
  out meanwhile), and what leaves the engine is a copy made there: no caller ever holds memory that paging
  frees.

Lock order (every path takes them in this order, never backwards, so no cycle can form):
``Engine._load_lock`` → ``SessionState.lock`` → ``Engine._lock`` → ``PhaseSignals._cond`` → ``MemoryManager._lock`` → leaves
(``HostPool._lock``, ``Handoff._cond``, ``HookDispatcher._lock``). Executor threads take only the manager's lock
(``on_growth``) and their run's ``Handoff``; nothing waits for an executor while holding the manager's lock.

The engine speaks in ids, plain dicts and tensors, so the in-process API and the daemon share it unchanged.
Its parts live by responsibility: the engine's models (catalog.py, mixed in as ``ModelCatalog``; preparing one
is registry.py's), session state (sessions.py), breakpoints, steering, recordings and SAEs (instruments.py,
mixed in as ``InstrumentOps``), the fast path's step loop and runner (scheduler.py, runner.py), memory
(memory.py), runs (executor.py, run_state.py), and what a driver does at a pause (inspection.py, mixed in as
``PauseOps``). This module keeps sessions, runs and paging signals.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
import threading
import time
from collections.abc import Callable

import torch

from . import context, hooks, migration, prefill, session_config, split
from .catalog import ModelCatalog
from .decode import Sampling
from .errors import (
    DjinnError,
    EngineLostError,
    ExecutionError,
    InvalidArgumentError,
    NotPausedError,
    OutOfMemoryError,
    RunFinishedError,
    SessionBusyError,
    SessionClosedError,
)
from .executor import PauseState, Replay, Run
from .handoff import Command, Event
from .inspection import PauseOps
from .instruments import InstrumentOps
from .memory import GiB, MiB, LRUPolicy, MemoryManager, PagingPolicy, Transfer, parse_bytes
from .phases import PhaseSignals, check_expected
from .policies import make_policy
from .recording import Recorder
from .prefill import DEFAULT_CHUNK
from .registry import LoadedModel, check_text
from .run_state import ENDED, RunState
from .scheduler import fast_plan
from .sessions import SessionState
from .spill import SpillStore
from .streaming import check_ring_slots


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_memory(
    device: torch.device, budget: int | None = None, host: int | None = None, spill: SpillStore | None = None
) -> MemoryManager:
    """A manager whose budget is what the device has free less a margin (models loaded later take their weights
    out of it), and a host pool of half the RAM, with ``spill`` as its disk tier. On CUDA 2 GiB of the pool are
    pinned now (~3 s, once), so the first page-outs do not pin on the swap path (that took 1.0-2.7 s for a 1 GiB
    session on the H200)."""
    derived = budget is None and device.type == "cuda"
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = max(free - 2 * GiB, 0)
        else:
            budget = 1 << 62
    if host is None:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    reserve = min(host, 2 * GiB) if device.type == "cuda" else 0
    return MemoryManager(device, budget, host, LRUPolicy(), budget_from_free_memory=derived, host_reserve=reserve,
                         spill=spill)


class Engine(ModelCatalog, InstrumentOps, PauseOps):
    """Loads models once and runs every session's forward passes. Thread-safe; see the module docstring."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        progress: Callable[[str], None] | None = None,
        memory: MemoryManager | None = None,
        deterministic: bool = False,
        fast: bool | None = None,
        weight_memory: int | str | None = None,
        ring_slots: int = 2,
        policy: str | PagingPolicy | None = None,
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """``deterministic=True`` restricts CUDA attention to the math kernel: the fused kernels are not bitwise
        repeatable across runs on the H100 (measured: two plain runs differ in the last bits), so exact
        comparisons between runs on a GPU need it. It sets process-wide torch flags.

        ``fast`` serves Llama-family models through the batched fast path (runner.py, scheduler.py) for runs
        that no breakpoint can stop; others take the module path. Its numerics differ from the module path in
        bf16 rounding, so it is on by default on CUDA only, and never with ``deterministic``.

        ``weight_memory`` (bytes or a size such as ``"16GiB"``) caps the device bytes each model's weights may
        take: a larger model keeps the decoder layers that fit and streams the rest from a pinned host arena
        through ``ring_slots`` device slots (streaming.py; on the fast path too, batched). ``None``: every model
        is moved to the device whole.

        ``policy``: the paging policy by name (``hold``, ``lru``, ``signal``, ``signal-keep-short``; policies.py)
        or object; None keeps the memory manager's (LRU by default).

        ``max_context`` caps the positions (context + new tokens) of any run below each model's own context: on a
        shared GPU an operator bounds what one request may hold (its KV is reserved for its whole length).

        ``prefill_chunk``: a longer prompt is fed in forwards of this many tokens, so its activations (reserved
        with its KV before it starts) are bounded by one chunk's, and other sessions decode between chunks
        (prefill.py)."""
        if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                        or max_context < 2):
            raise InvalidArgumentError(f"max_context must be an integer >= 2 or None, not {max_context!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise InvalidArgumentError(f"prefill_chunk must be a positive integer, not {prefill_chunk!r}")
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.weight_memory = None if weight_memory is None else parse_bytes(weight_memory)
        self.ring_slots = check_ring_slots(ring_slots)
        self.device = torch.device(device) if device is not None else default_device()
        if fast and deterministic:
            raise InvalidArgumentError("fast=True batches and fuses GEMMs, which deterministic=True rules out; pick one")
        self.fast = (self.device.type == "cuda" and not deterministic) if fast is None else bool(fast)
        if deterministic and self.device.type == "cuda":
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.backends.cuda.enable_math_sdp(True)
        self.memory = memory if memory is not None else default_memory(self.device)
        if policy is not None:
            self.memory.policy = make_policy(policy)
        self.phases = PhaseSignals(self.memory)
        self._progress = progress
        self._models: dict[str, LoadedModel] = {}
        self._sessions: dict[int, SessionState] = {}
        self._session_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()

    # sessions -------------------------------------------------------------------------------------------
    def open_session(self, model_id: str, owner: str = "local") -> int:
        loaded = self._model(model_id)
        return self._open(loaded, owner, None if loaded.stage is None else loaded.stage.open())

    def _open(self, loaded: LoadedModel, owner: str, stage: int | None) -> int:
        with self._lock:
            sid = next(self._session_ids)
            session = SessionState(sid, owner, loaded, self.memory, stage=stage)
            self._sessions[sid] = session
            self.memory.register(sid, session.gpu_tensors)
        return sid

    def _session(self, sid: int) -> SessionState:
        with self._lock:
            session = self._sessions.get(sid)
        if session is None:
            raise SessionClosedError(f"session {sid} does not exist or was closed; open a new one with model.session()")
        return session

    def close_session(self, sid: int) -> None:
        """Cancel the session's run if one is live, stop its thread and drop every tensor it held."""
        session = self._session(sid)
        if session.run is not None:
            session.run.abort_flag()
        with session.lock:
            run = session.run
            if run is not None and run.state not in ENDED:
                self._cancel(run)
            session.closed = True
            if run is not None and run.recorder is not None:
                run.recorder.free()
            session.run = None
            with self._lock:
                self._sessions.pop(sid, None)
            self.memory.release(sid)
        session.worker.close()
        if session.stage is not None:
            try:
                session.model.stage.close(session.stage)
            except (SessionClosedError, EngineLostError):
                pass  # the stage closed it already (its engine shut down first), or is gone with its engine

    def sessions(self, owner: str | None = None) -> list[dict[str, object]]:
        with self._lock:
            chosen = [s for s in self._sessions.values() if owner is None or s.owner == owner]
        described = []
        for s in chosen:
            try:
                described.append(self.describe_session(s.id))
            except SessionClosedError:
                continue  # closed (e.g. reclaimed from a dead client) while we were listing
        return described

    def describe_session(self, sid: int) -> dict[str, object]:
        session = self._session(sid)
        run = session.run
        return {
            "id": session.id,
            "owner": session.owner,
            "model": session.model.id,
            "state": session.state(),
            "history_tokens": len(session.history),
            "breakpoints": [bp.describe() for bp in session.breakpoints],
            "steering": [s.describe() for s in session.steering.values()],
            "run": None if run is None else run.snapshot(),
            "memory": self.memory.session_stats(sid),
        }

    # runs -----------------------------------------------------------------------------------------------
    def generate(
        self,
        sid: int,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        chat: bool | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        keep_logits: bool = False,
        fresh: bool = True,
    ) -> dict[str, object]:
        """Start a run; return its snapshot at the first pause, or at the end when nothing pauses it.

        ``fresh=True`` starts a new conversation (the session's history and KV are dropped); ``fresh=False``
        continues it: only the new tokens are computed, over the KV the session kept (for chat models the
        prompt becomes the next user turn of the template).
        """
        session = self._session(sid)
        if not isinstance(fresh, bool):
            raise InvalidArgumentError(f"fresh must be True or False, not {fresh!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < 1e4:
            raise InvalidArgumentError(f"temperature must be a number >= 0, not {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InvalidArgumentError(f"top_k must be a positive integer or None, not {top_k!r}")
        if type(seed) is not int:
            raise InvalidArgumentError(f"seed must be an integer, not {seed!r}")
        if chat is not None and not isinstance(chat, bool):
            raise InvalidArgumentError(f"chat must be True, False or None, not {chat!r}")
        if not isinstance(keep_logits, bool):
            raise InvalidArgumentError(f"keep_logits must be True or False, not {keep_logits!r}")
        with session.lock:
            self._sync(session)
            if session.run is not None and session.run.state not in ENDED:
                raise SessionBusyError(
                    f"session {sid} has a {session.run.state.value} run; resume it to the end (run.finish()) or "
                    f"cancel it (run.cancel()) before starting another"
                )
            loaded = session.model
            fresh = fresh or not session.history
            kept = 0 if fresh else context.cached_length(session.cache)
            if fresh:
                new = loaded.encode(prompt, chat)
            else:
                new = self._turn_ids(session, prompt, chat)
            input_ids = [*session.history[kept:], *new] if not fresh else new
            for steer in session.steering.values():
                if steer.edit.prefill_only:  # a bad position fails this call, not a packed prefill of many runs
                    steer.edit.rows(len(input_ids))
            total = kept + len(input_ids) + max_new_tokens
            limit, whose = loaded.max_positions, "this model has"
            if self.max_context is not None and (limit is None or self.max_context < limit):
                limit, whose = self.max_context, "this daemon allows a run (djinn serve --max-context)"
            if limit is not None and total > limit:
                raise InvalidArgumentError(
                    f"{kept + len(input_ids)} context tokens + max_new_tokens {max_new_tokens} exceed the "
                    f"{limit} positions {whose}; shorten the prompt, ask for fewer tokens or rewind"
                )
            if fresh:
                self.memory.drop(sid)
                session.history, session.cache = [], None
            return self._launch(session, input_ids, kept, max_new_tokens, Sampling(float(temperature), top_k, int(seed)),
                                bool(keep_logits))

    def _launch(
        self, session: SessionState, input_ids: list[int], kept: int, max_new_tokens: int, sampling: Sampling,
        keep_logits: bool, replay: Replay | None = None,
    ) -> dict[str, object]:
        """Admit and start a run of ``input_ids`` after the ``kept`` tokens of KV the session holds (call with its
        lock held); its snapshot at the first pause or the end. ``replay``: a run moved here paused (migration)."""
        loaded = session.model
        total = kept + len(input_ids) + max_new_tokens
        sid = session.id
        fast = loaded.scheduler is not None and fast_plan(session, 0) is not None
        chunk = self.prefill_chunk if prefill.chunked(session, bool(session.recordings)) else None
        kv = loaded.kv_bytes(total, fast)
        activations = loaded.prefill_bytes(prefill.pieces(len(input_ids), chunk)[0], kept + len(input_ids), fast)
        admitting = time.perf_counter()
        try:
            self.memory.admit(sid, kv + activations)
        except OutOfMemoryError as exc:
            whole = chunk is None and len(input_ids) > self.prefill_chunk
            raise OutOfMemoryError(
                f"{exc}. This run needs {kv / MiB:.1f} MiB of KV for {total} positions and "
                f"{activations / MiB:.1f} MiB for its prompt's activations"
                + (" (fed whole, not in chunks: a breakpoint that may hit at token step 0, a recording or an "
                   "edit at given positions sees the prompt's forward whole)" if whole else "")
            ) from None
        admit_s = time.perf_counter() - admitting
        if session.cache is not None:
            context.trim(session.cache, kept)
        if fast:
            session.cache = context.for_fast_path(session.cache, loaded.scheduler.runner.shape)
        else:
            session.cache = context.for_module_path(session.cache, loaded.model.config)
            if session.stage is not None:
                split.attach(session.cache, loaded.stage, session.stage)
        if session.run is not None and session.run.recorder is not None:
            session.run.recorder.free()
        recordings = list(session.recordings.values())
        recorder = Recorder(recordings, self.memory.pool, len(input_ids), max_new_tokens) if recordings else None
        run = Run(
            next(session._run_ids),
            session,
            input_ids,
            session.cache,
            kept,
            max_new_tokens,
            sampling,
            keep_logits,
            recorder,
            prefill_chunk=chunk,
            kv_bytes=kv,
        )
        run.replay = replay
        session.run = run
        if fast:
            loaded.scheduler.submit(run, input_ids, admit_s=admit_s)
        else:
            session.worker.submit(run.execute)
        return self._await(run)

    def _turn_ids(self, session: SessionState, prompt: str | list[int], chat: bool | None) -> list[int]:
        """The tokens a continued conversation adds: ids as given, text as is, or as a chat turn."""
        loaded = session.model
        if isinstance(prompt, str) and loaded.tokenizer is not None:
            if chat if chat is not None else loaded.chat:
                check_text(prompt, "the prompt")
                return context.chat_turn_ids(loaded.tokenizer, session.history, loaded.eos_ids, prompt)
            return loaded.words(prompt)
        return loaded.encode(prompt, chat)

    def fork(self, sid: int) -> int:
        """A new session of the same client with a copy of this one's history and KV (no breakpoints, no
        steering: it is free to differ). The source must not have a live run."""
        source = self._session(sid)
        with source.lock:
            self._idle(source, "fork it")
            with self.memory.resident(sid):
                self.memory.make_room(sum(t.untyped_storage().nbytes() for t in source.gpu_tensors()), for_sid=sid)
                cache = None if source.cache is None else context.clone(source.cache)
            stage = None if source.stage is None else source.model.stage.fork(source.stage)  # the stage's KV too
            new = self._open(source.model, source.owner, stage)
            forked = self._session(new)
            forked.history, forked.cache = list(source.history), cache
            return new

    def export_session(self, sid: int) -> dict[str, object]:
        """The session's whole state as CPU copies (migration.py), for ``import_session`` on another engine; the
        session itself is left as it was. An idle session or one whose run is paused (the run moves along and is
        replayed there to the same pause); a running run is refused."""
        session = self._session(sid)
        if session.stage is not None:
            raise split.not_movable(sid, session.model.id)
        with session.lock:
            self._sync(session)
            run = session.run
            if run is not None and run.state is RunState.RUNNING:
                raise SessionBusyError(
                    f"session {sid} has a running run; migrate it once the run has paused or finished"
                )
            paused = run if run is not None and run.state is RunState.PAUSED else None
            with self.memory.resident(sid):
                return migration.export_state(session, paused)

    def import_session(self, model_id: str, state: dict[str, object], owner: str = "local") -> int:
        """A new session of ``model_id`` holding a state that ``export_session`` made (here or on another engine).
        A paused run in the state runs again from its start here, its earlier pauses answered as they were, and
        stands at the same pause when this returns; if it cannot get there the new session is closed."""
        sid = self.open_session(model_id, owner=owner)
        session = self._session(sid)
        try:
            with session.lock:
                self.memory.make_room(migration.state_bytes(state), for_sid=sid)
                migration.import_state(session, state)
                if state.get("run") is not None:
                    self._replay(session, state["run"])
        except BaseException:
            self.close_session(sid)
            raise
        return sid

    def _replay(self, session: SessionState, moved: dict[str, object]) -> None:
        """Run the moved run again to the pause it stood at (executor.Replay); call with the session's lock held."""
        session._run_ids = itertools.count(moved["id"])
        answers = deque((Command(command), edited) for command, edited in moved["answers"])
        device = session.model.device
        configs = {number: config.moved(device) for number, config in moved["configs"].items()}
        replay = Replay(answers, PauseState(**moved["pause"]), list(moved["kv_edits"]), configs)
        try:
            self._launch(session, list(moved["prompt_ids"]), context.cached_length(session.cache),
                         moved["max_new_tokens"], Sampling(**moved["sampling"]), moved["keep_logits"], replay)
        except DjinnError as exc:
            raise ExecutionError(f"the paused run could not be run again to its pause on this engine: {exc}") from exc
        run = session.run
        if run.state is not RunState.PAUSED or run.replay is not None:
            if run.state not in ENDED:
                self._cancel(run)
            raise ExecutionError(
                f"the paused run ended ({run.state.value}) before reaching its pause again on this engine"
            )
        session_config.install(session, moved["config_now"].moved(session.model.device))

    def rewind(self, sid: int, tokens: int) -> dict[str, object]:
        """Keep only the first ``tokens`` tokens of the conversation (and their KV): the next ``fresh=False`` run
        continues from there, e.g. to replay a continuation with other steering."""
        session = self._session(sid)
        with session.lock:
            self._idle(session, "rewind it")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= len(session.history):
                raise InvalidArgumentError(
                    f"tokens must be an integer from 0 to {len(session.history)} (the conversation's length), "
                    f"not {tokens!r}"
                )
            with self.memory.resident(sid):
                if session.cache is not None:
                    context.trim(session.cache, min(tokens, context.cached_length(session.cache)))
                session.history = session.history[:tokens]
            return self.describe_session(sid)

    def run_layers(
        self, sid: int, first: int, last: int, past: int, hidden: torch.Tensor, mask: torch.Tensor | None,
        position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Decoder layers ``first .. last`` of a stage session (``register_stage``) on a host's hidden state,
        after ``past`` tokens of its KV: the hidden state after ``last``, on this engine's device (split.py)."""
        session = self._session(sid)
        loaded, device = session.model, session.model.device
        # A host in this process calls from its run's thread, in inference mode, which the page-in's views must
        # not be made in (its copies run on another thread); and that run's own hooks at these layers' paths see
        # them, so the stage's hooks must not fire for it a second time (unbound).
        with torch.inference_mode(False), session.lock, self.memory.resident(sid), torch.inference_mode(), \
                hooks.bind(None):
            if session.cache is None:
                session.cache = context.for_module_path(None, loaded.model.config)
            out = split.layers_forward(
                loaded.model.get_submodule(loaded.anatomy.layers_path), first, last, loaded.forward_call.cache_arg, session.cache, past,
                hidden.to(device), None if mask is None else mask.to(device), position_ids.to(device),
                tuple(t.to(device) for t in position_embeddings),
            )
        self.memory.on_growth(sid)
        return out

    def _idle(self, session: SessionState, what: str) -> None:
        self._sync(session)
        if session.run is not None and session.run.state not in ENDED:
            raise SessionBusyError(
                f"session {session.id} has a {session.run.state.value} run; finish or cancel it to {what}"
            )

    def page_out(self, sid: int) -> dict[str, object]:
        """Page a paused (or idle) session's state to the host now; it comes back on the next use."""
        session = self._session(sid)
        with session.lock:
            return self._transfer_report(sid, self.memory.page_out(sid))

    def page_in(self, sid: int) -> dict[str, object]:
        session = self._session(sid)
        with session.lock:
            return self._transfer_report(sid, self.memory.page_in(sid))

    def io_wait(self, sid: int, expected_s: float | None = None) -> dict[str, object]:
        """The session now waits on IO (a tool call) for about ``expected_s`` seconds: the policy may page its KV
        out, off the caller's path, and bring it back just before the hinted end. Returns at once with the
        decision; the next run or ``compute`` ends the wait."""
        expected_s = check_expected(expected_s)
        session = self._session(sid)
        with session.lock:
            self._sync(session)
            if session.run is not None and session.run.state is RunState.RUNNING:
                raise SessionBusyError(
                    f"session {sid} has a running run; an IO wait starts between runs or at a pause (wait for "
                    f"the run to end, or cancel it)"
                )
            return {**self.phases.io_wait(sid, expected_s), **self.memory.session_stats(sid)}

    def compute(self, sid: int) -> dict[str, object]:
        """The session's IO wait is over: queued page-outs and prefetches are dropped and its KV comes back now
        (``paged`` stays true when the device has no room yet: the next run's admission brings it back)."""
        session = self._session(sid)
        with session.lock:
            return self._transfer_report(sid, self.phases.compute(sid))

    def _transfer_report(self, sid: int, transfer: Transfer | None) -> dict[str, object]:
        times = ("seconds", "wall_seconds", "call_seconds", "room_seconds")
        if transfer is None:
            moved = {"bytes": 0, "copies": 0, **dict.fromkeys(times, 0.0)}
        else:
            moved = {"bytes": transfer.nbytes, "copies": transfer.copies, **{t: getattr(transfer, t) for t in times}}
        return {**moved, **self.memory.session_stats(sid)}

    def status(self) -> dict[str, object]:
        """Everything a dashboard needs: models, sessions with their memory, device and pool totals."""
        device: dict[str, object] = {"type": self.device.type}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            device.update(
                name=torch.cuda.get_device_name(self.device),
                total=total,
                free=free,
                allocated=torch.cuda.memory_allocated(self.device),
                reserved=torch.cuda.memory_reserved(self.device),
            )
        memory = {**self.memory.stats(), "phase_signals": self.phases.stats()}
        return {"device": device, "memory": memory, "models": self.models(), "sessions": self.sessions()}

    def wait(self, sid: int, timeout: float | None = None) -> dict[str, object] | None:
        """Wait for a running run to pause or end (after an interrupted ``generate`` or ``resume``)."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf")
        ):
            raise InvalidArgumentError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
        session = self._session(sid)
        with session.lock:
            run = session.run
            if run is not None and run.state is RunState.RUNNING:
                return self._await(run, timeout=timeout)
            return None if run is None else run.snapshot()

    def _sync(self, session: SessionState) -> None:
        """Process an event that an interrupted driver left behind (call with the session lock held)."""
        run = session.run
        if run is not None and run.state is RunState.RUNNING:
            self._await(run, raise_failure=False, timeout=0)

    def _live_run(self, session: SessionState) -> Run:
        self._sync(session)
        run = session.run
        if run is None:
            raise NotPausedError(f"session {session.id} has no run; start one with session.generate(prompt)")
        if run.state in ENDED:
            raise RunFinishedError(
                f"run {run.id} of session {session.id} has {run.state.value}; start a new one with session.generate()"
            )
        return run

    def _paused_run(self, session: SessionState) -> tuple[Run, PauseState]:
        run = self._live_run(session)
        if run.state is not RunState.PAUSED or run.pause is None:
            raise NotPausedError(f"run {run.id} of session {session.id} is {run.state.value}, not paused")
        return run, run.pause

    def resume(self, sid: int, mode: str = "continue") -> dict[str, object]:
        """Resume a paused run: ``continue`` to the next hit, ``step`` to the next layer, ``finish`` to the end."""
        commands = {"continue": Command.CONTINUE, "step": Command.STEP, "finish": Command.FINISH}
        if not isinstance(mode, str) or mode not in commands:  # a list off the wire cannot even be looked up
            raise InvalidArgumentError(f"resume mode must be one of {sorted(commands)}, not {mode!r}")
        session = self._session(sid)
        with session.lock:
            run, _ = self._paused_run(session)
            with self.memory.resident(session.id):
                self._move(run, RunState.RUNNING)
                run.handoff.send(commands[mode])
            return self._await(run)

    def cancel(self, sid: int) -> dict[str, object]:
        """End the session's run. Safe from any thread: a run mid-forward stops at its next layer."""
        session = self._session(sid)
        if session.run is not None:
            session.run.abort_flag()
        with session.lock:
            run = session.run
            if run is None:
                raise NotPausedError(f"session {sid} has no run to cancel")
            if run.state not in ENDED:
                self._cancel(run)
            return run.snapshot()

    def _cancel(self, run: Run) -> None:
        run.abort_flag()
        if run.state is RunState.PAUSED:
            self._move(run, RunState.RUNNING)
            run.handoff.send(Command.ABORT)
        self._await(run, raise_failure=False)

    def _move(
        self, run: Run, to: RunState, pause: PauseState | None = None, error: BaseException | None = None
    ) -> None:
        """Every state change of a run: checked against run_state.MOVES, recorded in the session's history when
        the run ends, and told to the memory manager, which derives from it whether the session may be paged."""
        run.move(to, pause, error)
        if to.ended:
            session = run.session
            session.history = [*session.history[: run.context_length], *run.prompt_ids, *run.tokens]
        self.memory.on_run(run.session.id, to)

    def _await(self, run: Run, raise_failure: bool = True, timeout: float | None = None) -> dict[str, object]:
        """Take the run's next event (the first one not yet processed); with a timeout, it may still be running.

        A driver interrupted while waiting (Ctrl-C in a notebook) leaves the event unprocessed; the next call
        on the session picks it up here, so the run's state never goes stale.
        """
        posted = run.handoff.wait(run.seen, timeout)
        if posted is None:
            return run.snapshot()
        while posted.event is Event.PAUSED and run._aborting:
            run.handoff.send(Command.ABORT)
            posted = run.handoff.wait(posted.seq)
        run.seen = posted.seq
        if posted.event is Event.PAUSED:
            self._move(run, RunState.PAUSED, pause=posted.payload)
        elif posted.event is Event.FINISHED:
            self._move(run, RunState.FINISHED)
        elif posted.event is Event.CANCELLED:
            self._move(run, RunState.CANCELLED)
        else:
            self._move(run, RunState.FAILED, error=posted.payload)
            if raise_failure:
                self._raise_failure(run)
        return run.snapshot()

    @staticmethod
    def _raise_failure(run: Run) -> None:
        exc = run.error
        if isinstance(exc, DjinnError):
            raise type(exc)(f"run {run.id} stopped at token step {run.token_step}: {exc}") from exc
        raise ExecutionError(
            f"the forward pass failed at token step {run.token_step} ({type(exc).__name__}: {exc}); the run ended, "
            f"the session is still usable"
        ) from exc

    def run_snapshot(self, sid: int) -> dict[str, object] | None:
        session = self._session(sid)
        return None if session.run is None else session.run.snapshot()

    def run_logits(self, sid: int) -> torch.Tensor:
        """The kept per-step logits ``[steps, vocab]`` of the session's last run (``keep_logits=True``)."""
        session = self._session(sid)
        run = session.run
        if run is None or not run.keep_logits:
            raise InvalidArgumentError("logits were not kept; pass keep_logits=True to generate()")
        if run.state not in ENDED:
            raise NotPausedError("logits are available once the run has finished")
        return torch.stack(run.logits) if run.logits else torch.empty(0)

    def shutdown(self) -> None:
        """Close every session and take the engine's hooks off its models."""
        self.phases.close()
        for sid in [s["id"] for s in self.sessions()]:
            try:
                self.close_session(sid)
            except SessionClosedError:
                continue
        if self.memory.spill is not None:
            self.memory.spill.close()
        with self._lock:
            for loaded in self._models.values():
                loaded.dispatcher.remove()
                if loaded.ring is not None:
                    loaded.ring.remove()
                if loaded.scheduler is not None:
                    loaded.scheduler.close()
            self._models.clear()
