"""The Python API: thin handles (``Model``, ``Session``, ``Run``, ``Pause``) over a backend.

The backend is the ``Engine`` itself in-process, or a ``DaemonClient`` with the same methods; the handles never
hold weights or engine state, only ids and the last snapshot the backend returned. Magics and widgets are built
on these handles and nothing else.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from .edits import Ablate, AddVector, Edit, Replace, Scale, SetPositions
from .engine import Engine
from .errors import DjinnError, NotPausedError

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


def connect(endpoint: str | None = None, token: str | None = None, *, start: bool = True) -> Any:
    """Use a daemon from now on: the local one (started if needed) or ``tcp://host:port`` with its token.

    Later ``load()`` calls go to it; the returned client can also be passed as ``backend=`` explicitly.
    """
    global _backend
    from .client import connect as connect_client

    client = connect_client(endpoint, token, start=start)
    with _lock:
        _backend = client
    return client


def default_backend() -> Any:
    """The daemon after ``connect()`` (or with ``DJINN_MODE=daemon``), else the in-process engine."""
    if _backend is not None:
        return _backend
    if os.environ.get("DJINN_MODE", "inprocess") == "daemon":
        return connect()
    return local_engine()


def load(name: str, *, dtype: str = "auto", backend: Any = None) -> Model:
    """Load a model by built-in name, folder or cached hub id, once per backend, and return a handle to it."""
    backend = backend if backend is not None else default_backend()
    return Model(backend, backend.load_model(name, dtype=dtype))


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

    def __repr__(self) -> str:
        return f"<djinn Model {self.name}: {self.num_layers} layers, {self.info['dtype']} on {self.info['device']}>"


class Session:
    """A debugging session. Use as a context manager, or call ``close()``, to give its memory back."""

    def __init__(self, backend: Any, model: Model, sid: int) -> None:
        self._backend = backend
        self.model = model
        self.id = sid
        self._run: Run | None = None

    def break_at(
        self,
        target: int | str,
        *,
        side: str = "output",
        once: bool = False,
        tokens: int | range | tuple[int, int] | str | None = None,
        max_hits: int | None = None,
    ) -> int:
        """Pause whenever ``target`` (a layer index or module path) runs; returns the breakpoint id.

        ``tokens`` limits it to token steps (0 is the prefill; ``(a, b)`` and ``"a-b"`` include both ends),
        ``once``/``max_hits`` to a number of pauses.
        """
        bp = self._backend.add_breakpoint(self.id, target, side, tokens, 1 if once else max_hits)
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
    ) -> Run:
        """Start generating; returns when the run first pauses or finishes (check ``run.paused``).

        ``chat=None`` uses the model's default (instruct models wrap the prompt in their chat template).
        Decoding is greedy unless ``temperature > 0`` (then seeded, so runs repeat). The session keeps the
        conversation: ``fresh=False`` continues it (the prompt is the next turn, only new tokens are computed),
        the default starts a new one.
        """
        try:
            snapshot = self._backend.generate(
                self.id, prompt, max_new_tokens, chat, temperature, top_k, seed, keep_logits, fresh
            )
        except DjinnError:
            last = self._backend.run_snapshot(self.id)
            if last is not None and (self._run is None or last["run_id"] != self._run.id):
                self._run = Run(self._backend, self, last)
            raise
        self._run = Run(self._backend, self, snapshot)
        return self._run

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

    def __init__(self, backend: Any, session: Session, snapshot: dict[str, Any]) -> None:
        self._backend = backend
        self.session = session
        self._snapshot = snapshot
        self._pause: Pause | None = None

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
    def token_step(self) -> int:
        return self._snapshot["token_step"]

    @property
    def error(self) -> str | None:
        return self._snapshot["error"]

    @property
    def logits(self) -> torch.Tensor:
        """Per-step next-token logits ``[steps, vocab]``, when generated with ``keep_logits=True``."""
        return self._backend.run_logits(self.session.id)

    def resume(self) -> Run:
        """Continue to the next breakpoint hit, or to the end."""
        return self._update(self._backend.resume(self.session.id, "continue"))

    def step(self) -> Run:
        """Continue to the output of the next decoder layer (into the next token step after the last layer)."""
        return self._update(self._backend.resume(self.session.id, "step"))

    def finish(self) -> Run:
        """Run to the end ignoring breakpoints; persistent steering still applies."""
        return self._update(self._backend.resume(self.session.id, "finish"))

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

    def __repr__(self) -> str:
        where = ""
        if self.paused:
            p = self._snapshot["pause"]
            where = f" at {p['path']} ({p['side']}), token step {p['token_step']}"
        return f"<djinn Run {self.id} {self.state}{where}: {len(self.tokens)} tokens {self.text!r}>"


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
        self.run._snapshot = {**self.run._snapshot, "pause": self.info}
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
        self.run._snapshot = {**self.run._snapshot, "pause": self.info}
        return self

    def logit_lens(self, k: int = 5, position: int = -1, edit: Edit | None = None) -> list[dict[str, Any]]:
        """Top-k tokens this activation would predict if it went straight to the final norm and unembedding.

        With ``edit``, what it would predict after that edit, which is not applied (a preview).
        """
        self._check_current()
        return self.run._backend.logit_lens(self.run.session.id, k, position, edit)

    def resume(self) -> Run:
        return self.run.resume()

    def step(self) -> Run:
        return self.run.step()

    def finish(self) -> Run:
        return self.run.finish()

    def __repr__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else self.path
        return (
            f"<djinn Pause at {where} ({self.side}), token step {self.token_step}, "
            f"activation {list(self.shape)} {self.dtype}, {self.info['edits']} edit(s)>"
        )


def _tuple(positions: list[int] | tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if positions is None else tuple(positions)
