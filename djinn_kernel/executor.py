"""A run: one generation of a session, executed on the session's executor thread, pausable inside a forward.

Invariants:
- ``Run.execute`` runs on its session's executor thread (``Worker``) and is the only code that drives the model's
  forward for this run; it binds the run to that thread (``hooks.bind``) so the shared hooks route activations here.
- The executor blocks in ``Handoff.pause`` at a hit. While it is blocked the driver may read and edit
  ``PauseState.current``; the executor takes the value back, unchanged object or edited copy, on resume.
- Returning ``None`` from ``on_activation`` leaves the module's output untouched: an unmodified pause is
  bitwise invisible.
- A cancelled run unwinds by raising ``Aborted`` (a ``BaseException``) from its next hook or step, so no
  model code can swallow it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import context, session_config
from .breakpoints import Breakpoint
from .conditions import Probe, fires, lens_top1
from .decode import Sampling, decode
from .edits import Edit
from .handoff import Command, Event, Handoff
from .hooks import bind
from .recording import Recorder
from .run_state import RunState, check_move

if TYPE_CHECKING:
    from .sessions import SessionState


class Worker:
    """A session's executor thread: runs its runs one at a time, for as long as the session lives.

    One thread per session, not per run: on the H200 a forward loop on a freshly started thread ran at twice the
    per-token time of one on a thread that had run forwards before (82.5 vs 38.9 ms/token, 7B shape, measured
    2026-12-02). A daemon thread, so a paused run never holds up interpreter exit; started on first use.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        """Let the thread finish its current job (a cancelled run unwinds first) and end."""
        if self._thread is None:
            return
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


@dataclass
class PauseState:
    """Where a run stopped, and the activation there (``original`` as produced, ``current`` after edits)."""

    number: int
    path: str
    layer: int | None
    side: str
    token_step: int
    reason: str
    breakpoint_ids: list[int]
    original: torch.Tensor
    current: torch.Tensor
    edits: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "number": self.number,
            "path": self.path,
            "layer": self.layer,
            "side": self.side,
            "token_step": self.token_step,
            "reason": self.reason,
            "breakpoints": self.breakpoint_ids,
            "shape": list(self.current.shape),
            "dtype": str(self.current.dtype).removeprefix("torch."),
            "device": str(self.current.device),
            "edits": self.edits,
        }


Answer = tuple[Command, "torch.Tensor | None"]  # how a pause was resumed, and its activation if edited (a CPU copy)


@dataclass
class KVEdit:
    """A KV write made at a pause (inspection.edit_kv), journaled for a replay (CPU copies; None: not written):
    the new keys/values at ``positions`` of ``layer``, and what they replaced (a move exports the K/V as it was
    when the run began)."""

    pause: int
    layer: int
    positions: list[int]
    keys: torch.Tensor | None
    values: torch.Tensor | None
    old_keys: torch.Tensor | None
    old_values: torch.Tensor | None


@dataclass
class Replay:
    """How a paused run moved from another engine gets back to its pause (migration.py): it runs again from its
    start and, instead of stopping, answers its earlier pauses as the user did there (``answers``: the same
    commands, the same edited activations; ``kv_edits``: the same KV writes, at the pause they were made), then
    stops at the pause it stood at (``at``), showing that pause's activations as they were there, edits included,
    and its KV as edited there; at each pause where the user changed the session's configuration there, the
    replay takes that configuration on (``configs``)."""

    answers: deque[Answer]
    at: PauseState
    kv_edits: list[KVEdit]
    configs: dict[int, session_config.Config]  # the configuration after each pause where the user changed it

    def arrive(self, pause: PauseState) -> PauseState:
        """The pause the replay reached, checked against the one it must reach, with the source's activations."""
        at = self.at
        here, there = (pause.number, pause.path, pause.side, pause.token_step), (at.number, at.path, at.side, at.token_step)
        if here != there:
            raise ReplayDiverged(f"the replay paused at {here} (number, module, side, token step), not at {there}")
        device = pause.original.device
        pause.original, pause.current = at.original.to(device), at.current.to(device)
        pause.edits = at.edits
        return pause


class ReplayDiverged(RuntimeError):
    """A replayed run reached another pause than the one it was moved at (an engine bug or nondeterminism)."""


class Aborted(BaseException):
    """Raised inside a hook to unwind a forward whose run was cancelled (not an error of the model)."""


@dataclass
class Timing:
    """Where a fast-path run's time went (scheduler.py): its own prompt forwards, the batched decode steps it took
    part in, steps it ran alone (it could pause), and other runs' prompt forwards it decoded a token in (riding
    them, scheduler.py), after its admission (``admit_s``: its own KV paged back in and others paged out to make
    room for it, memory.py). The rest of its wall time is the request path and the step loop's host work. A
    module-path run has none."""

    admit_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0  # the rows of those steps, summed: the batch sizes it shared its steps with
    solo_s: float = 0.0
    others_prefill_s: float = 0.0
    others_prefills: int = 0


@dataclass
class Steering:
    id: int
    path: str
    layer: int | None
    side: str
    edit: Edit

    @functools.cached_property
    def added(self) -> torch.Tensor:
        """``alpha * vector`` of an ``AddVector`` edit, computed once: the fast path adds it on every step."""
        return self.edit.alpha * self.edit.vector

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "path": self.path, "layer": self.layer, "side": self.side, "kind": self.edit.kind}


class Run:
    """One generate call of a session. It is the hook sink while its forwards run on the executor thread."""

    def __init__(
        self,
        run_id: int,
        session: SessionState,
        prompt_ids: list[int],
        cache: object,
        context_length: int,
        max_new_tokens: int,
        sampling: Sampling,
        keep_logits: bool,
        recorder: Recorder | None = None,
        prefill_chunk: int | None = None,
        kv_bytes: int = 0,
    ) -> None:
        """``prefill_chunk``: the prompt is fed in forwards of at most this many tokens (None: whole; the engine
        decides, prefill.py); ``kv_bytes``: the run's KV for its whole length, what its reservation falls to
        once the prompt is in."""
        self.id = run_id
        self.session = session
        self.prompt_ids = prompt_ids
        # What the module path feeds first: the prompt, or after a hand-over from the fast path its last token.
        # A host list: a device tensor made on the request thread would wait there for the GPU's queued work.
        self.feed = prompt_ids
        self.cache = cache  # the session's, already holding ``context_length`` tokens of its history
        self.context_length = context_length
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.keep_logits = keep_logits
        self.recorder = recorder  # the session's recordings, for this run (recording.py)
        self.prefill_chunk = prefill_chunk
        self.kv_bytes = kv_bytes
        self.timing: Timing | None = None  # set by the fast path's scheduler, which fills it
        self.generator = sampling.generator(session.model.device)
        self.handoff = Handoff()
        self.seen = self.handoff.seq  # the last event the engine has processed
        self.state = RunState.RUNNING
        self.token_step = 0
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.pause: PauseState | None = None
        self.error: BaseException | None = None
        self.answers: list[Answer] = []  # every pause's answer so far: what a migration replays (Replay)
        self.replay: Replay | None = None  # set on a run moved here paused, until it stands at that pause again
        # The session's configuration as the run began and after each pause where the user changed it (by pause
        # number): what a migration's replay needs (session_config.py). It changes at pauses only: while the run
        # runs, the call driving it holds the session's lock, which every change takes.
        self.started = session_config.snapshot(session)
        self.configs: dict[int, session_config.Config] = {}
        self.kv_edits: list[KVEdit] = []  # KV writes made at its pauses (inspection.edit_kv): a replay repeats them
        self._pauses = itertools.count(1)
        self._tops: dict[int, int | None] = {}  # breakpoint id -> the lens's top token there at the last step
        self._stepping = False
        self._finishing = False
        self._aborting = False
        # While a prompt is fed in chunks nothing may stop or record it (each forward sees part of it); set by
        # the path feeding it, for the whole of token step 0 (a breakpoint added meanwhile acts from step 1).
        self.chunking = False

    # executor side ---------------------------------------------------------------------------------------
    def execute(self) -> None:
        """Run the token loop on the module path; a run the fast path handed over continues where it stopped
        (``feed`` is then its last token and ``cache`` its KV so far)."""
        loaded = self.session.model
        done = len(self.tokens)
        try:
            with bind(self), torch.inference_mode():
                result = decode(
                    loaded.model,
                    loaded.forward_call,
                    torch.tensor([self.feed], dtype=torch.long, device=loaded.device),
                    self.cache,
                    self.max_new_tokens - done,
                    set(loaded.eos_ids),
                    self.sampling,
                    on_step=lambda step: self._on_step(done + step),
                    keep_logits=self.keep_logits,
                    on_token=self.tokens.append,
                    generator=self.generator,
                    # a run the fast path handed over feeds what it had left in one forward
                    prefill_chunk=self.prefill_chunk if self.feed is self.prompt_ids else None,
                )
            self.logits.extend(result.logits)
            self.handoff.post(Event.FINISHED)
        except Aborted:
            self.handoff.post(Event.CANCELLED)
        except BaseException as exc:  # noqa: BLE001 - any failure of the forward ends this run only
            self.handoff.post(Event.FAILED, exc)

    def _on_step(self, step: int) -> None:
        """Called before each forward, and between the chunks of a chunked prompt (``step`` 0 again)."""
        if self._aborting:
            raise Aborted
        if step == 0:
            if self.prefill_chunk is not None and len(self.feed) > self.prefill_chunk:
                self.chunking = True
        else:
            self.prefilled()  # before ``token_step`` moves on: it tells the first decode step
            self.session.memory.on_growth(self.session.id)
        self.token_step = step

    def prefilled(self) -> None:
        """The prompt is in: chunking is over and the reservation for its activations goes back (memory.py)."""
        if self.chunking or self.token_step == 0:
            self.chunking = False
            self.session.memory.prefilled(self.session.id, self.kv_bytes)

    def on_activation(self, path: str, side: str, value: torch.Tensor, hooked: bool = True) -> torch.Tensor | None:
        """A hook's report (or the fast path's, with ``hooked=False``: it applied the steering itself and sends
        recorded rows through its taps, scheduler.py)."""
        if self._aborting:
            raise Aborted
        changed = False
        for steering in self.session.steering_at(path, side) if hooked else ():
            if steering.edit.prefill_only and self.token_step:
                continue  # a patch of the prompt's rows: decode steps are left alone
            value = steering.edit.apply(value)
            changed = True
        layer = self.session.model.anatomy.layer_index(path)
        if self.chunking:
            return value if changed else None
        if not self._finishing:
            fired: list[str] = []
            hits = self.session.breakpoints.match(path, side, self.token_step, lambda bp: self._holds(bp, value, fired))
            stepped = self._stepping and side == "output" and layer is not None
            if hits or stepped:
                reason = f"condition: {'; '.join(fired)}" if fired else "breakpoint" if hits else "step"
                new = self._pause(path, layer, side, value, reason, [b.id for b in hits])
                if new is not None:
                    value, changed = new, True
        if hooked and side == "output" and self.recorder is not None and self.recorder.wants(path):
            self.recorder.take(path, self.token_step, value)
        return value if changed else None

    def watches(self, path: str, side: str) -> bool:
        """Whether a report at ``path`` (``side``) in this forward could change the value, pause, or be recorded;
        when not, a split model's host may run the remote layers around it in one call (split.py)."""
        if self.session.steering_at(path, side) or (self._stepping and side == "output"):
            return True
        if not self._finishing and any(bp.wants(path, side, self.token_step) for bp in self.session.breakpoints):
            return True
        return side == "output" and self.recorder is not None and self.recorder.wants(path)

    def _holds(self, bp: Breakpoint, value: torch.Tensor, fired: list[str]) -> bool:
        """Evaluate a conditional breakpoint here; a condition that holds adds why to ``fired``."""
        fed = self.tokens[self.token_step - 1] if 0 < self.token_step <= len(self.tokens) else None
        sae = self.session.saes.get(bp.path)
        probe = Probe(value, fed, self.session.model.lens, None if sae is None else sae.encode, self._tops.get(bp.id))
        top = None
        if bp.condition.kind == "lens_top1":
            top = self._tops[bp.id] = lens_top1(probe)
        reason = fires(bp.condition, probe, top)
        if reason is not None:
            fired.append(reason)
        return reason is not None

    def _pause(
        self, path: str, layer: int | None, side: str, value: torch.Tensor, reason: str, ids: list[int]
    ) -> torch.Tensor | None:
        self._stepping = False
        pause = PauseState(next(self._pauses), path, layer, side, self.token_step, reason, ids, value, value)
        replay = self.replay
        if replay is not None and replay.answers:  # a pause passed before the move: answered as it was there
            self._write_kv(replay, pause.number)
            command, edited = replay.answers.popleft()
            if edited is not None:
                pause.current, pause.edits = edited.to(value.device), 1
            config = replay.configs.get(pause.number)
            if config is not None:  # the user changed the configuration at this pause there
                session_config.install(self.session, config)
                self.configs[pause.number] = config
        else:
            if replay is not None:  # the engine installs the configuration as it is now there meanwhile
                self.replay = None
                pause = replay.arrive(pause)
                self._write_kv(replay, pause.number)
            before = session_config.ids(self.session)
            command = self.handoff.pause(pause)
            if session_config.ids(self.session) != before:
                self.configs[pause.number] = session_config.snapshot(self.session)
        if command is Command.ABORT:
            raise Aborted
        self.answers.append((command, pause.current.detach().to("cpu", copy=True) if pause.edits else None))
        self._stepping = command is Command.STEP
        self._finishing = command is Command.FINISH
        return pause.current if pause.edits else None

    def _write_kv(self, replay: Replay, number: int) -> None:
        """Repeat the KV writes made at pause ``number`` before the move (and journal them here in turn)."""
        for edit in [e for e in replay.kv_edits if e.pause == number]:
            device = context.kv_shape(self.cache, edit.layer)[3]
            keys, values = (None if t is None else t.to(device) for t in (edit.keys, edit.values))
            with torch.inference_mode():
                context.write_kv(self.cache, edit.layer, edit.positions, keys, values)
            self.kv_edits.append(edit)

    # driver side -----------------------------------------------------------------------------------------
    def move(self, to: RunState, pause: PauseState | None = None, error: BaseException | None = None) -> None:
        """The run's only state change (see run_state.py): ``pause`` is the pause it moves into, if any."""
        check_move(self.state, to)
        self.state, self.pause = to, pause
        if error is not None:
            self.error = error

    def abort_flag(self) -> None:
        self._aborting = True

    def gpu_tensors(self) -> list[torch.Tensor]:
        """Device tensors this run holds beyond the session's KV cache: the paused activation."""
        return [] if self.pause is None else [self.pause.original, self.pause.current]

    def snapshot(self) -> dict[str, object]:
        loaded = self.session.model
        return {
            "run_id": self.id,
            "session_id": self.session.id,
            "state": self.state.value,
            "pause": None if self.pause is None else self.pause.describe(),
            "token_step": self.token_step,
            "prompt_tokens": len(self.prompt_ids),
            "prompt_ids": list(self.prompt_ids),
            "max_new_tokens": self.max_new_tokens,
            "sampling": {"temperature": self.sampling.temperature, "top_k": self.sampling.top_k, "seed": self.sampling.seed},
            "tokens": list(self.tokens),
            "text": loaded.decode(self.tokens),
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            "timing": None if self.timing is None else dataclasses.asdict(self.timing),
        }
