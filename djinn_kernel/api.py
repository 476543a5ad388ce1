"""The Python API: thin handles (``Model``, ``Session``, ``Run``, ``Pause``) over a backend.

The backend is the ``Engine`` itself in-process, or a ``DaemonClient`` with the same methods; the handles never
hold weights or engine state, only ids and the last snapshot the backend returned. Magics and widgets are built
on these handles and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .edits import Ablate, AddVector, Edit, Replace, Scale, SetPositions
from .engine import Engine
from .sae import SAE
from .errors import DjinnError, InvalidArgumentError, NotPausedError
from .report import pause_html, pause_text, run_html, run_text

_engine: Engine | None = None
_backend: Any = None
_lock = threading.Lock()


def local_engine() -> Engine:
    """The in-process engine, created on first use (importing Djinn starts nothing)."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = Engine()
        return _engine


def connect(
    endpoint: str | None = None,
    token: str | None = None,
    *,
    server_key: str | None = None,
    start: bool = True,
    name: str | None = None,
    progress: Callable[[str], None] | None = print,
) -> Any:
    """Use a daemon from now on: the local one (started if needed) or ``tcp://host:port`` with a token and the
    daemon's server key (`djinn serve --listen` prints both; `djinn token add NAME` makes a token per user).

    Later ``load()`` calls go to it; the returned client can also be passed as ``backend=`` explicitly.
    ``name`` is what other clients see as this session's owner (default: the notebook's name, else
    ``python <pid>``). Starting the local daemon takes seconds, so ``progress`` hears about it (None: silent).
    """
    global _backend
    from .client import connect as connect_client
    from .runtime import read_info, runtime_dir

    started = None
    if endpoint is None and start and progress is not None and read_info(runtime_dir()) is None:
        progress("djinn: starting the local daemon (a few seconds, once per machine)…")
        started = time.monotonic()
    client = connect_client(endpoint, token, server_key=server_key, start=start, name=name or client_name())
    if started is not None and progress is not None:
        progress(f"djinn: daemon pid {client.daemon['pid']} ready in {time.monotonic() - started:.1f} s")
    with _lock:
        _backend = client
    return client


def client_name() -> str:
    """How this process introduces itself to a daemon: the notebook's file name under Jupyter, else its pid."""
    notebook = os.environ.get("JPY_SESSION_NAME")
    return os.path.basename(notebook) if notebook else f"python {os.getpid()}"


def default_backend() -> Any:
    """The daemon after ``connect()`` (or with ``DJINN_MODE=daemon``), else the in-process engine. A client closed
    since is forgotten here, so ``load`` after ``client.close()`` does not fail on it."""
    if _backend is not None and not getattr(_backend, "closed", False):
        return _backend
    if os.environ.get("DJINN_MODE", "inprocess") == "daemon":
        return connect()
    return local_engine()


def status(backend: Any = None) -> dict[str, Any]:
    """The device (on a cluster: each engine, its GPU, resident models and sessions), the models and every
    session, of ``backend`` or the default one (``%djinn status`` prints it)."""
    return (backend if backend is not None else default_backend()).status()


def load(name: str, *, dtype: str = "auto", split_at: int | None = None, backend: Any = None) -> Model:
    """Load a model by built-in name, folder or cached hub id, once per backend, and return a handle to it.

    ``split_at``: on a cluster, split the model by layer over two engines (GPUs), for a model larger than one
    GPU: decoder layers ``0 .. split_at - 1`` on one, the rest and the sessions on the other (docs/cluster.md).
    Breakpoints, edits, steering and recordings at any decoder layer's input or output work as on a whole model."""
    backend = backend if backend is not None else default_backend()
    if split_at is None:
        return Model(backend, backend.load_model(name, dtype=dtype))
    if not callable(getattr(type(backend), "load_split", None)):
        raise InvalidArgumentError(
            "this backend runs one engine in process, so no other can serve part of the layers; splitting a model "
            "by layer needs a cluster backend (djinn_kernel.cluster.connect_cluster(), or a daemon started with "
            "djinn serve --ray --engines 2 or more)"
        )
    return Model(backend, backend.load_split(name, split_at, dtype))


POLL_INTERVAL = 0.05  # how often a streaming call reads the run's tokens (seconds)
HEARTBEAT = 1.0  # a progress report at least this often, so a long prefill still shows that time passes

ProgressCallback = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    """Where a run is while a call drives it: reported as tokens appear, about once a second, and at the end."""

    run_id: int
    state: str
    token_step: int
    tokens: int
    max_new_tokens: int
    text: str
    new_text: str  # what ``text`` gained since the previous report
    elapsed: float
    rate: float | None  # tokens per second generated during this call
    pause: dict[str, Any] | None
    done: bool  # the call has returned: the run is paused or has ended

    def line(self) -> str:
        """One status line, e.g. ``run 3 · running · 57/200 tokens · 12.3 tokens/s · 4.6 s``."""
        if self.pause is not None:
            p = self.pause
            where = f"layer {p['layer']}" if p["layer"] is not None else p["path"]
            state = f"paused at {where} ({p['side']}), token step {p['token_step']}"
        else:
            state = self.state
        rate = f" · {self.rate:.1f} tokens/s" if self.rate is not None else ""
        return f"run {self.run_id} · {state} · {self.tokens}/{self.max_new_tokens} tokens{rate} · {self.elapsed:.1f} s"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (Kernel → Interrupt) while a call drove a run: the run was cancelled and its session is idle.

    It stays a ``KeyboardInterrupt`` so that scripts and "Run all" stop as the user asked; ``run`` is the
    cancelled run (None when the interrupt came before it started), also ``session.run``.
    """

    def __init__(self, run: Run | None, message: str) -> None:
        super().__init__(message)
        self.run = run


class _Driver:
    """Drives one blocking backend call (``generate`` or ``resume``) and turns an interrupt into a cancel.

    Without a progress callback the call runs on the caller's thread. With one, it runs on a helper thread
    while the caller polls ``run_snapshot`` (which the engine answers without waiting for the run) and
    reports each new token. Either way Ctrl-C cancels the run instead of leaving it running unowned.
    """

    def __init__(
        self, backend: Any, sid: int, on_progress: ProgressCallback | None, known_run: int | None, tokens: int
    ) -> None:
        """``tokens``: what the run holds as the call starts (0 for a new run), the base of the call's rate even
        when the first snapshot already shows the run further on."""
        self.backend = backend
        self.sid = sid
        self.on_progress = on_progress
        self.known_run = known_run  # a snapshot of this run id is not the call's run (generate: the previous one)
        self.start = time.monotonic()
        self.first_tokens = tokens
        self.reported: tuple[int, str, int] | None = None
        self.last_text = ""
        self.last_report = self.start
        self.helper_done: threading.Event | None = None  # set when the streaming helper thread's call returned

    def __call__(self, call: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        try:
            if self.on_progress is None:
                return call(*args)
            return self._streamed(call, *args)
        except KeyboardInterrupt:
            raise self._cancelled() from None

    def stream(self, call: Callable[..., dict[str, Any]], *args: Any) -> Iterator[Progress]:
        """Progress reports while ``call`` runs on a helper thread; the last one has ``done`` set."""
        result: dict[str, Any] = {}
        done = self.helper_done = threading.Event()

        def target() -> None:
            try:
                result["snapshot"] = call(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread below
                result["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, name="djinn-drive", daemon=True).start()
        while not done.wait(POLL_INTERVAL):
            snapshot = self.backend.run_snapshot(self.sid)
            if snapshot is not None and snapshot["run_id"] != self.known_run:
                report = self._report(snapshot, done=False)
                if report is not None:
                    yield report
        if "error" in result:
            raise result["error"]
        self.snapshot = result["snapshot"]
        yield self._report(self.snapshot, done=True)  # type: ignore[misc]

    def _streamed(self, call: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        assert self.on_progress is not None
        for report in self.stream(call, *args):
            self.on_progress(report)
        return self.snapshot

    def _report(self, snapshot: dict[str, Any], done: bool) -> Progress | None:
        now = time.monotonic()
        tokens, text = len(snapshot["tokens"]), snapshot["text"] or ""  # None: a model without a tokenizer
        key = (tokens, snapshot["state"], snapshot["run_id"])
        if not done and key == self.reported and now - self.last_report < HEARTBEAT:
            return None
        self.reported, self.last_report = key, now
        new_text = text[len(self.last_text) :] if text.startswith(self.last_text) else text
        self.last_text = text
        elapsed = now - self.start
        made = tokens - self.first_tokens
        return Progress(
            run_id=snapshot["run_id"],
            state=snapshot["state"],
            token_step=snapshot["token_step"],
            tokens=tokens,
            max_new_tokens=snapshot.get("max_new_tokens", tokens),
            text=text,
            new_text=new_text,
            elapsed=elapsed,
            rate=made / elapsed if made and elapsed > 0 else None,
            pause=snapshot["pause"],
            done=done,
        )

    def _cancelled(self) -> _Cancelled:
        """Cancel whatever run the interrupted call was driving; the session is idle afterwards."""
        snapshot = None
        for attempt in range(2):  # again once the helper returned: an early interrupt may precede the run's start
            try:
                self.backend.cancel(self.sid)
            except DjinnError:
                pass  # no run yet, or it ended meanwhile: nothing to cancel
            if attempt == 0 and self.helper_done is not None:
                self.helper_done.wait()
                continue
            snapshot = self.backend.wait(self.sid, None)
            if snapshot is None or snapshot["state"] not in ("paused", "running"):
                break
        return _Cancelled(snapshot if snapshot is not None and snapshot["run_id"] != self.known_run else None)


class _Cancelled(Exception):
    """Internal: an interrupt turned into a cancel; the handle that made the call raises ``RunInterrupted``."""

    def __init__(self, snapshot: dict[str, Any] | None) -> None:
        super().__init__()
        self.snapshot = snapshot


def _interrupted(run: Run | None) -> RunInterrupted:
    if run is None:
        return RunInterrupted(None, "interrupted before the run started; the session is ready")
    return RunInterrupted(
        run,
        f"interrupted: run {run.id} cancelled at token step {run.token_step} after {len(run.tokens)} token(s); "
        f"the session is ready for the next run",
    )


class Model:
    """A loaded model, shared by all of its sessions."""

    def __init__(self, backend: Any, info: dict[str, Any]) -> None:
        self._backend = backend
        self.info = info

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def num_layers(self) -> int:
        return self.info["num_layers"]

    @property
    def hidden_size(self) -> int | None:
        return self.info["hidden_size"]

    def session(self) -> Session:
        """A new session: its own breakpoints, steering, runs and KV cache, on this shared model."""
        return Session(self._backend, self, self._backend.open_session(self.info["id"]))

    def module_paths(self) -> list[str]:
        return self._backend.module_paths(self.info["id"])

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token id as text, decoded on its own (labels for plots)."""
        return self._backend.token_strings(self.info["id"], list(token_ids))

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids (no special tokens, no chat template), e.g. prompts to patch position by position."""
        return self._backend.tokenize(self.info["id"], text)

    def __repr__(self) -> str:
        return f"<djinn Model {self.name}: {self.num_layers} layers, {self.info['dtype']} on {self.info['device']}>"


class Session:
    """A debugging session. Use as a context manager, or call ``close()``, to give its memory back."""

    def __init__(self, backend: Any, model: Model, sid: int) -> None:
        self._backend = backend
        self.model = model
        self.id = sid
        self._run: Run | None = None
        self._saes: dict[int | str, SAE] = {}  # attached here, by target as given and by module path

    def break_at(
        self,
        target: int | str,
        *,
        side: str = "output",
        once: bool = False,
        tokens: int | range | tuple[int, int] | str | None = None,
        max_hits: int | None = None,
        when: str | None = None,
    ) -> int:
        """Pause whenever ``target`` (a layer index or module path) runs; returns the breakpoint id.

        ``tokens`` limits it to token steps (0 is the prefill; ``(a, b)`` and ``"a-b"`` include both ends),
        ``once``/``max_hits`` to a number of pauses, ``when`` to the steps where a condition holds:
        ``"norm > 50"``, ``"dim[12] < -3"``, ``"lens_top1 == ' Paris'"``, ``"token == ' Paris'"`` (the pause's
        ``reason`` says which fired). Conditions are checked on the device; only a pause comes back.
        """
        bp = self._backend.add_breakpoint(self.id, target, side, tokens, 1 if once else max_hits, when)
        return bp["id"]

    def delete(self, breakpoint_id: int | None = None) -> list[int]:
        """Delete one breakpoint, or all when no id is given."""
        return self._backend.remove_breakpoint(self.id, breakpoint_id)

    @property
    def breakpoints(self) -> list[dict[str, Any]]:
        return self._backend.describe_session(self.id)["breakpoints"]

    def steer(self, target: int | str, vector: torch.Tensor, alpha: float = 1.0, *, side: str = "output") -> int:
        """Add ``alpha * vector`` to ``target``'s activation on every token of every run, without pausing."""
        return self.steer_with(target, AddVector(vector, alpha), side=side)

    def steer_with(self, target: int | str, edit: Edit, *, side: str = "output") -> int:
        """Apply any edit (``Scale``, ``Ablate`` ...) at ``target`` on every forward; returns the steering id."""
        return self._backend.add_steering(self.id, target, edit, side)["id"]

    def unsteer(self, steering_id: int | None = None) -> list[int]:
        """Remove one persistent steering, or all when no id is given."""
        return self._backend.remove_steering(self.id, steering_id)

    @property
    def steering(self) -> list[dict[str, Any]]:
        return self._backend.describe_session(self.id)["steering"]

    def record(self, targets: int | str | list[int | str], positions: list[int] | None = None) -> list[int]:
        """Keep the outputs of ``targets`` (decoder-layer indices or module paths) at every step of the next runs,
        without pausing: ``run.recorded[target]`` is ``[rows, width]``, the prompt's positions (or the
        ``positions`` chosen) then one row per generated token but the last. Returns the recordings' ids.
        On a fast-path engine decoder-layer outputs are recorded there, batched; any other module's output moves
        the run to the module path, where hooks see it (docs/interpretability.md)."""
        many = targets if isinstance(targets, (list, tuple)) else [targets]
        return [self._backend.add_recording(self.id, t, positions)["id"] for t in many]

    def attach_sae(self, target: int | str, sae: str | Path | SAE) -> dict[str, Any]:
        """Attach a sparse autoencoder (a folder in the SAELens format, read here, or an ``SAE``) to ``target``'s
        output: ``pause.features(k)`` there, and ``steer_feature``/``clamp_feature`` by its features."""
        loaded = sae if isinstance(sae, SAE) else SAE.load(sae)
        info = self._backend.attach_sae(self.id, target, loaded.tensors(), loaded.apply_b_dec_to_input)
        self._saes[info["path"]] = self._saes[target] = loaded
        return info

    def detach_sae(self, target: int | str) -> None:
        detached = self._saes.get(self._backend.detach_sae(self.id, target))
        self._saes = {k: v for k, v in self._saes.items() if v is not detached}

    def steer_feature(self, target: int | str, feature: int, alpha: float = 1.0) -> int:
        """Persistent steering along one SAE feature's decoder direction (``alpha`` times it, every token)."""
        return self.steer(target, self._sae(target).direction(feature), alpha)

    def clamp_feature(self, target: int | str, feature: int, value: float) -> int:
        """Persistent steering that sets one SAE feature's contribution to ``value`` at every token."""
        return self.steer_with(target, self._sae(target).clamp(feature, value))

    def _sae(self, target: int | str) -> SAE:
        if target not in self._saes:
            raise InvalidArgumentError(f"no SAE is attached at {target!r}; session.attach_sae({target!r}, folder) first")
        return self._saes[target]

    def unrecord(self, recording_id: int | None = None) -> list[int]:
        """Stop a recording (all of them by default); returns the ids removed."""
        return self._backend.remove_recording(self.id, recording_id)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        *,
        chat: bool | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        keep_logits: bool = False,
        fresh: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> Run:
        """Start generating; returns when the run first pauses or finishes (check ``run.paused``).

        ``chat=None`` uses the model's default (instruct models wrap the prompt in their chat template).
        Decoding is greedy unless ``temperature > 0`` (then seeded, so runs repeat). The session keeps the
        conversation: ``fresh=False`` continues it (the prompt is the next turn, only new tokens are computed),
        the default starts a new one. ``on_progress`` receives a ``Progress`` as tokens appear (streaming).
        Ctrl-C cancels the run and raises ``RunInterrupted``.
        """
        driver, steered = self._driver(on_progress is not None, on_progress)
        args = (self.id, prompt, max_new_tokens, chat, temperature, top_k, seed, keep_logits, fresh)
        try:
            snapshot = driver(self._backend.generate, *args)
        except _Cancelled as cancelled:
            raise self._interrupted(cancelled, steered) from None
        except DjinnError:
            last = self._backend.run_snapshot(self.id)
            if last is not None and (self._run is None or last["run_id"] != self._run.id):
                self._run = Run(self._backend, self, last, steered)
            raise
        return self._adopt(snapshot, steered)

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        *,
        chat: bool | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        keep_logits: bool = False,
        fresh: bool = True,
    ) -> Iterator[str]:
        """Generate, yielding text as it is produced until the run pauses or ends; the run is then ``self.run``.

        ``for piece in session.stream("Once upon a time", 200): print(piece, end="")``. Leaving the loop
        early (``break``, Ctrl-C) cancels the run.
        """
        driver, steered = self._driver(True, None)
        args = (self.id, prompt, max_new_tokens, chat, temperature, top_k, seed, keep_logits, fresh)
        yield from _pieces(
            driver,
            driver.stream(self._backend.generate, *args),
            lambda snapshot: self._adopt(snapshot, steered),
            lambda cancelled: self._interrupted(cancelled, steered),
        )

    def _driver(self, streaming: bool, on_progress: ProgressCallback | None) -> tuple[_Driver, bool]:
        """A driver for a new run and whether persistent steering touches it (for highlighting its tokens)."""
        known = self._run.id if self._run is not None else None
        if streaming:  # ask the backend: snapshots of an earlier run must not be reported as this one's
            last = self._backend.run_snapshot(self.id)
            known = last["run_id"] if last is not None else None
        return _Driver(self._backend, self.id, on_progress, known, 0), bool(self.steering)

    def _adopt(self, snapshot: dict[str, Any], steered: bool) -> Run:
        self._run = Run(self._backend, self, snapshot, steered)
        return self._run

    def _interrupted(self, cancelled: _Cancelled, steered: bool) -> RunInterrupted:
        if cancelled.snapshot is None:
            return _interrupted(None)
        return _interrupted(self._adopt(cancelled.snapshot, steered))

    @property
    def run(self) -> Run | None:
        """The most recent run of this session."""
        return self._run

    @property
    def history(self) -> int:
        """How many tokens the conversation holds (prompts and replies); ``rewind`` takes a number up to this."""
        return self._backend.describe_session(self.id)["history_tokens"]

    def fork(self) -> Session:
        """A new session with this one's conversation and KV copied, and no breakpoints or steering of its own
        yet: branch a conversation to try other steering on the same context."""
        return Session(self._backend, self.model, self._backend.fork(self.id))

    def migrate(self, engine: int | str | None = None) -> dict[str, Any]:
        """Move this session to another engine (GPU) of a cluster (``djinn_kernel.cluster``), exactly: its
        conversation and KV, breakpoints, steering, recordings and SAEs; it keeps its id. ``engine``: an index or
        a name (``"gpu1"``); None lets placement choose. A paused run moves along: it runs again there from its
        start, its earlier pauses answered as you answered them, to the same pause, which shows the same
        activations (your edits, KV writes and changes to breakpoints, steering or recordings made at its pauses
        included); ``run`` and ``run.pause`` go on working. A running run cannot move (wait for its pause or end).
        An idle session's last run stays behind: read its logits and recordings before."""
        if not callable(getattr(type(self._backend), "migrate", None)):  # a daemon client has it; its daemon may refuse
            raise InvalidArgumentError(
                "this session's backend runs one engine in process, so there is no other to move it to; migration "
                "needs a cluster backend (djinn_kernel.cluster.connect_cluster(), or a daemon started with "
                "djinn serve --ray)"
            )
        return self._backend.migrate(self.id, engine)

    def rewind(self, tokens: int) -> Session:
        """Keep the first ``tokens`` tokens of the conversation; the next ``generate(..., fresh=False)`` goes on
        from there."""
        self._backend.rewind(self.id, tokens)
        return self

    def status(self) -> dict[str, Any]:
        """State, breakpoints, steering, the current run and memory (bytes on the GPU and on the host)."""
        return self._backend.describe_session(self.id)

    def page_out(self) -> dict[str, Any]:
        """Move this paused (or idle) session's GPU state to host memory now; it returns on the next use."""
        return self._backend.page_out(self.id)

    def page_in(self) -> dict[str, Any]:
        """Bring paged state back ahead of time (a resume does this by itself)."""
        return self._backend.page_in(self.id)

    def io_wait(self, expected_s: float | None = None) -> dict[str, Any]:
        """Say this session now waits on IO (a tool call) for about ``expected_s`` seconds (None: unknown).

        Returns at once with the policy's decision (``paging``, ``reason``, ``estimated_swap_s``): under the
        ``signal`` policies the KV is paged out in the background and, with a hint, paged back in just before
        the wait should end. The next ``generate`` or ``compute()`` brings it back bit for bit either way."""
        return self._backend.io_wait(self.id, expected_s)

    def compute(self) -> dict[str, Any]:
        """Say the IO wait is over: pending background paging is dropped and the KV comes back now (if the device
        has no room yet, ``paged`` stays true and the next ``generate`` brings it back when it is admitted)."""
        return self._backend.compute(self.id)

    @contextlib.contextmanager
    def tool_call(self, expected_s: float | None = None) -> Iterator[dict[str, Any]]:
        """``with session.tool_call(expected_s=2.0): result = call_the_tool()``: ``io_wait`` on entry, ``compute``
        on exit (also when the tool raises); yields the ``io_wait`` decision."""
        decision = self.io_wait(expected_s)
        try:
            yield decision
        finally:
            self.compute()

    def close(self) -> None:
        self._backend.close_session(self.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<djinn Session {self.id} on {self.model.name}>"


class Run:
    """One generation. Methods that move it forward return the run itself, updated, once it pauses or ends."""

    def __init__(self, backend: Any, session: Session, snapshot: dict[str, Any], steered: bool = False) -> None:
        self._backend = backend
        self.session = session
        self._snapshot = snapshot
        self._pause: Pause | None = None
        self.steered = steered  # persistent steering was on when it started: every token is touched
        self.edited_steps: set[int] = set()  # token steps whose forward an edit at a pause changed
        self._recorded: dict[int | str, torch.Tensor] | None = None

    def _update(self, snapshot: dict[str, Any]) -> Run:
        self._snapshot = snapshot
        return self

    @property
    def id(self) -> int:
        return self._snapshot["run_id"]

    @property
    def state(self) -> str:
        return self._snapshot["state"]

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    @property
    def pause(self) -> Pause | None:
        """The current pause; the same object for as long as the run stays at this pause."""
        info = self._snapshot["pause"]
        if info is None:
            return None
        if self._pause is None or self._pause.info["number"] != info["number"]:
            self._pause = Pause(self, info)
        return self._pause

    @property
    def tokens(self) -> list[int]:
        """Generated token ids so far (the prompt excluded)."""
        return list(self._snapshot["tokens"])

    @property
    def text(self) -> str:
        """Generated text so far."""
        return self._snapshot["text"]

    @property
    def prompt_ids(self) -> list[int]:
        return list(self._snapshot["prompt_ids"])

    @property
    def timing(self) -> dict[str, float] | None:
        """Where a fast-path run's time went: its prompt forwards (``prefill_s``), the batched decode steps it
        took part in (``decode_s``, ``decode_steps``), steps alone (``solo_s``) and other runs' prompt forwards
        it rode while decoding, a token from each (``others_prefill_s``, ``others_prefills``); None on the module
        path."""
        return self._snapshot.get("timing")

    @property
    def token_step(self) -> int:
        return self._snapshot["token_step"]

    @property
    def error(self) -> str | None:
        return self._snapshot["error"]

    @property
    def logits(self) -> torch.Tensor:
        """Per-step next-token logits ``[steps, vocab]``, when generated with ``keep_logits=True``."""
        return self._backend.run_logits(self.session.id)

    @property
    def recorded(self) -> dict[int | str, torch.Tensor]:
        """What the session's recordings kept in this run, by module path and, for decoder layers, by index too
        (CPU tensors ``[rows, width]``; see ``Session.record``). Kept by this handle once read; the engine keeps
        a run's rows only until the session's next run starts."""
        if self._recorded is None:
            current = self._backend.run_snapshot(self.session.id)
            if current is None or current["run_id"] != self.id:
                raise InvalidArgumentError(
                    f"run {self.id}'s recordings were released when its session started another run; read "
                    f"run.recorded before generating again"
                )
            by_path = self._backend.recorded(self.session.id)
            layers = {path: i for i, path in enumerate(self.session.model.info.get("layer_paths", []))}
            self._recorded = {**by_path, **{layers[p]: t for p, t in by_path.items() if p in layers}}
        return self._recorded

    def resume(self, *, on_progress: ProgressCallback | None = None) -> Run:
        """Continue to the next breakpoint hit, or to the end (``on_progress``: see ``Session.generate``)."""
        return self._move("continue", on_progress)

    def step(self, *, on_progress: ProgressCallback | None = None) -> Run:
        """Continue to the output of the next decoder layer (into the next token step after the last layer)."""
        return self._move("step", on_progress)

    def finish(self, *, on_progress: ProgressCallback | None = None) -> Run:
        """Run to the end ignoring breakpoints; persistent steering still applies."""
        return self._move("finish", on_progress)

    def stream(self, mode: str = "continue") -> Iterator[str]:
        """Resume (``continue``, ``step`` or ``finish``), yielding text as it is produced until the next pause or
        the end. Leaving the loop early (``break``, Ctrl-C) cancels the run."""
        driver = _Driver(self._backend, self.session.id, None, None, len(self.tokens))
        yield from _pieces(
            driver, driver.stream(self._backend.resume, self.session.id, mode), self._update, self._interrupted
        )

    def _move(self, mode: str, on_progress: ProgressCallback | None) -> Run:
        driver = _Driver(self._backend, self.session.id, on_progress, None, len(self.tokens))
        try:
            return self._update(driver(self._backend.resume, self.session.id, mode))
        except _Cancelled as cancelled:
            raise self._interrupted(cancelled) from None

    def _interrupted(self, cancelled: _Cancelled) -> RunInterrupted:
        if cancelled.snapshot is not None and cancelled.snapshot["run_id"] == self.id:
            self._snapshot = cancelled.snapshot
        return _interrupted(self)

    def cancel(self) -> Run:
        """Stop the run where it is; the session becomes idle."""
        return self._update(self._backend.cancel(self.session.id))

    def wait(self, timeout: float | None = None) -> Run:
        """Block until a running run pauses or ends, e.g. after Ctrl-C interrupted ``generate`` or ``resume``."""
        snapshot = self._backend.wait(self.session.id, timeout)
        if snapshot is not None and snapshot["run_id"] == self.id:
            self._snapshot = snapshot
        return self

    def refresh(self) -> Run:
        snapshot = self._backend.run_snapshot(self.session.id)
        if snapshot is not None and snapshot["run_id"] == self.id:
            self._snapshot = snapshot
        return self

    @property
    def touched(self) -> list[bool]:
        """For each generated token, whether steering or an edit changed the forward that produced it."""
        return [self.steered or i in self.edited_steps for i in range(len(self.tokens))]

    def __repr__(self) -> str:
        where = ""
        if self.paused:
            p = self._snapshot["pause"]
            where = f" at {p['path']} ({p['side']}), token step {p['token_step']}"
        return f"<djinn Run {self.id} {self.state}{where}: {len(self.tokens)} tokens {self.text!r}>"

    def __str__(self) -> str:
        return run_text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(run_text(self))

    def _repr_html_(self) -> str:
        return run_html(self)


class Pause:
    """Where a run stopped. Edits apply to the paused activation and take effect when the run resumes."""

    def __init__(self, run: Run, info: dict[str, Any]) -> None:
        self.run = run
        self.info = info
        self._cache: tuple[int, torch.Tensor] | None = None

    path = property(lambda self: self.info["path"])
    layer = property(lambda self: self.info["layer"])
    side = property(lambda self: self.info["side"])
    token_step = property(lambda self: self.info["token_step"])
    reason = property(lambda self: self.info["reason"])
    shape = property(lambda self: tuple(self.info["shape"]))
    dtype = property(lambda self: self.info["dtype"])

    def _check_current(self) -> None:
        current = self.run._snapshot["pause"]
        if not self.run.paused or current is None or current["number"] != self.info["number"]:
            raise NotPausedError("this pause is over (the run has moved on); use run.pause for the current one")

    @property
    def activation(self) -> torch.Tensor:
        """The activation as the forward will continue with it (edits included), copied to the CPU."""
        self._check_current()
        edits = self.info["edits"]
        if self._cache is None or self._cache[0] != edits:
            self._cache = (edits, self.run._backend.activation(self.run.session.id).detach().to("cpu", copy=True))
        return self._cache[1]

    @property
    def original(self) -> torch.Tensor:
        """The activation as the module produced it, before any edit."""
        self._check_current()
        return self.run._backend.activation(self.run.session.id, True).detach().to("cpu", copy=True)

    def apply(self, edit: Edit) -> Pause:
        self._check_current()
        self.info = self.run._backend.edit(self.run.session.id, edit)
        self._cache = None  # the count of edits alone cannot tell a reset-then-edit from the edit before it
        self.run._snapshot = {**self.run._snapshot, "pause": self.info}
        self.run.edited_steps.add(self.token_step)
        return self

    def replace(self, value: torch.Tensor) -> Pause:
        return self.apply(Replace(value))

    def scale(self, factor: float, positions: list[int] | None = None) -> Pause:
        return self.apply(Scale(factor, _tuple(positions)))

    def add(self, vector: torch.Tensor, alpha: float = 1.0, positions: list[int] | None = None) -> Pause:
        return self.apply(AddVector(vector, alpha, _tuple(positions)))

    def ablate(self, direction: torch.Tensor, positions: list[int] | None = None) -> Pause:
        return self.apply(Ablate(direction, _tuple(positions)))

    def set(self, positions: list[int], values: torch.Tensor) -> Pause:
        return self.apply(SetPositions(_tuple(positions), values))

    def reset(self) -> Pause:
        """Drop every edit made at this pause."""
        self._check_current()
        self.info = self.run._backend.reset_edits(self.run.session.id)
        self._cache = None
        self.run._snapshot = {**self.run._snapshot, "pause": self.info}
        self.run.edited_steps.discard(self.token_step)
        return self

    def patch(self, source: Run, positions: list[int] | None = None) -> Pause:
        """Set this activation at ``positions`` (all by default) to ``source``'s at the same place, as a recording
        of this module kept it (``session.record``): activation patching. At the prefill the source's prompt
        rows (its prompt must be as long as this one), at decode step t the row of the token that step fed."""
        self._check_current()
        recorded = source.recorded.get(self.path)
        if recorded is None:
            raise InvalidArgumentError(
                f"run {source.id} recorded nothing at {self.path}; record it first (session.record({self.path!r}))"
            )
        tokens = self.shape[-2]
        prompt = len(source.prompt_ids)
        if self.token_step == 0 and prompt != tokens:
            raise InvalidArgumentError(
                f"run {source.id}'s prompt has {prompt} tokens, this one {tokens}: patch between prompts of the "
                f"same length"
            )
        start = 0 if self.token_step == 0 else prompt + self.token_step - 1
        rows = recorded[start : start + tokens]
        if rows.shape[0] != tokens:
            raise InvalidArgumentError(
                f"run {source.id} has no recorded row for token step {self.token_step} at {self.path} (it recorded "
                f"{recorded.shape[0]} rows)"
            )
        chosen = list(range(tokens)) if positions is None else list(positions)
        return self.set(chosen, rows[chosen])

    def logit_lens(self, k: int = 5, position: int = -1, edit: Edit | None = None) -> list[dict[str, Any]]:
        """Top-k tokens this activation would predict if it went straight to the final norm and unembedding.

        With ``edit``, what it would predict after that edit, which is not applied (a preview).
        """
        self._check_current()
        return self.run._backend.logit_lens(self.run.session.id, k, position, edit)

    def attention(self) -> torch.Tensor:
        """Attention weights ``[heads, tokens, context + tokens]`` of the decoder layer this activation feeds
        (this layer at its input, the next at an output), for this step's tokens, computed from the activation
        as edited so far: what that layer will attend to. Llama-family models."""
        self._check_current()
        return self.run._backend.attention(self.run.session.id)

    def features(self, k: int = 5) -> list[list[dict[str, Any]]]:
        """The ``k`` most active features of the SAE attached here (``session.attach_sae``), per token of the
        activation as edited so far: ``[{"feature": id, "activation": value}, ...]`` for each token."""
        self._check_current()
        return self.run._backend.features(self.run.session.id, k)

    def add_feature(self, feature: int, alpha: float = 1.0, positions: list[int] | None = None) -> Pause:
        """Add ``alpha`` times the feature's decoder direction (the SAE attached at this module)."""
        return self.add(self.run.session._sae(self.path).direction(feature), alpha, positions)

    def clamp_feature(self, feature: int, value: float, positions: list[int] | None = None) -> Pause:
        """Set the feature's contribution to ``value`` (the SAE attached at this module)."""
        return self.apply(self.run.session._sae(self.path).clamp(feature, value, _tuple(positions)))

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer ``layer``'s keys and values (``[kv_heads, tokens, head_dim]``, CPU copies) for the tokens
        before this step: the conversation so far, which this step attends to besides its own new tokens."""
        self._check_current()
        held = self.run._backend.kv(self.run.session.id, layer)
        return held["keys"], held["values"]

    def edit_kv(
        self, layer: int, positions: int | list[int] | range, keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> Pause:
        """Overwrite layer ``layer``'s keys and/or values (``[kv_heads, len(positions), head_dim]``) at those
        token positions, e.g. zero a token's values to knock it out. It acts at once: this step's layers that
        have not run yet and every later step read the new values, and the session keeps them (rewind before a
        position drops the edit with the token)."""
        self._check_current()
        self.run._backend.edit_kv(self.run.session.id, layer, positions, keys, values)
        self.run.edited_steps.add(self.token_step)
        return self

    @property
    def paused(self) -> bool:
        """Whether the run still waits at this pause (False once it moved on)."""
        current = self.run._snapshot["pause"]
        return self.run.paused and current is not None and current["number"] == self.info["number"]

    def resume(self, *, on_progress: ProgressCallback | None = None) -> Run:
        return self.run.resume(on_progress=on_progress)

    def step(self, *, on_progress: ProgressCallback | None = None) -> Run:
        return self.run.step(on_progress=on_progress)

    def finish(self, *, on_progress: ProgressCallback | None = None) -> Run:
        return self.run.finish(on_progress=on_progress)

    def cancel(self) -> Run:
        return self.run.cancel()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(pause_text(self))

    def _repr_html_(self) -> str:
        return pause_html(self)

    def __repr__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else self.path
        return (
            f"<djinn Pause at {where} ({self.side}), token step {self.token_step}, "
            f"activation {list(self.shape)} {self.dtype}, {self.info['edits']} edit(s)>"
        )


def _pieces(
    driver: _Driver,
    reports: Iterator[Progress],
    adopt: Callable[[dict[str, Any]], Any],
    interrupted: Callable[[_Cancelled], RunInterrupted],
) -> Iterator[str]:
    """The text pieces of a streamed call; the run is cancelled if the consumer stops early or is interrupted."""
    finished = False
    try:
        for report in reports:
            if report.done:
                adopt(driver.snapshot)
                finished = True
            if report.new_text:
                yield report.new_text
    except KeyboardInterrupt:
        finished = True
        raise interrupted(driver._cancelled()) from None
    finally:
        if not finished:
            interrupted(driver._cancelled())  # the loop was left early: cancel, and the handle shows it


def _tuple(positions: list[int] | tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if positions is None else tuple(positions)
