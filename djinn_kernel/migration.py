"""A session's whole state as host copies, and a session made again from it: what moves a session from one engine
to another (``Engine.export_session`` / ``Engine.import_session``; the cluster carries the state between engines
through Ray's object store, cluster/backend.py).

Invariants:
- An idle session's whole state is its conversation (``history``), the K/V of the consistent prefix of it
  (``context.cached_length``), and its configuration: breakpoints (with their hit counts), steering, recordings and
  attached SAEs.
- A paused run cannot be carried as it stands (its executor thread's stack is mid-forward), so it moves as what
  makes it again: the session as it was when the run began (the history and K/V before its prompt, breakpoint hits
  as they were), the run's arguments, the answer given at each of its earlier pauses (command, edited activation)
  and the paused activations themselves. The importing engine runs it from its start, answers those pauses the
  same way and stops at the same pause (executor.Replay): in deterministic mode every value it computes is the
  source's, bit for bit, and the activation shown and resumed is the source's in any mode. What a replay cannot
  repeat is refused: a run still running, one whose session's breakpoints, steering, recordings or SAEs changed
  since it began, one whose KV a pause edited.
- ``export_state`` runs with the session's lock held and its state resident (``MemoryManager.resident``); it returns
  CPU copies only, so nothing it returns aliases memory that paging frees, and all of it pickles.
- ``import_state`` writes the same K/V values into the cache kind the session had (a transformers ``DynamicCache`` on
  the module path, ``BlockKV`` blocks on the fast path), on the importing engine's device: the next run there
  computes exactly what it would have computed on the source (bitwise in deterministic mode, same kernels).
- The ids a user holds stay valid: breakpoints, steering and recordings keep their ids, and every id counter of the
  session (theirs and the runs') goes on from where it stood, so run ids keep growing across a move.
- The last run (its kept logits, its recordings) stays behind: read it before moving the session.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import torch

from . import context
from .breakpoints import BreakpointTable
from .errors import InvalidArgumentError, SessionBusyError
from .executor import Run, Steering
from .kv_blocks import BlockKV
from .sessions import SessionState

FORMAT = 1  # bumped when the state's layout changes; an engine refuses a state of another format
_COUNTERS = ("_steer_ids", "_record_ids", "_run_ids")


def _next_id(holder: object, name: str) -> int:
    """The id ``holder.name`` (an ``itertools.count``) gives next, leaving the counter where it was."""
    value = next(getattr(holder, name))
    setattr(holder, name, itertools.count(value))
    return value


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _edit_to(edit: Any, device: torch.device | str) -> Any:
    return replace(edit, **{name: t.detach().to(device, copy=True) for name, t in edit.tensors().items()})


def start_of(session: SessionState) -> tuple[object, dict[int, int]]:
    """What a run's replay needs of the session as the run begins: its configuration (which breakpoints,
    steering, recordings and SAEs: ids are never reused) and its breakpoints' hit counts."""
    config = (
        tuple(bp.id for bp in session.breakpoints),
        tuple(session.steering),
        tuple(session.recordings),
        tuple((path, id(sae)) for path, sae in session.saes.items()),
    )
    return config, {bp.id: bp.hits for bp in session.breakpoints}


def export_state(session: SessionState, run: Run | None = None) -> dict[str, Any]:
    """The resident ``session`` (idle, or with ``run`` paused) as plain data and CPU tensors (call with its lock
    held)."""
    hits: dict[int, int] = {}
    if run is not None:
        config, hits = run.started
        if config != start_of(session)[0]:
            raise SessionBusyError(
                f"run {run.id} cannot move while paused: its session's breakpoints, steering, recordings or SAEs "
                f"changed since it began, and a replay of it elsewhere would not pass where it passed here; finish "
                f"or cancel the run, then migrate"
            )
    cache = session.cache
    length = context.cached_length(cache) if run is None else run.context_length
    layers = len(context.layer_lengths(cache))
    kv: dict[str, Any] | None = None
    if length:
        if not isinstance(cache, BlockKV) and any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            raise InvalidArgumentError(
                "this model keeps a sliding-window KV cache, which migration cannot carry yet; start the "
                "conversation again on the other engine"
            )
        keys, values = [], []
        for layer in range(layers):  # copies [kv_heads, length, head_dim], then on the host
            k, v = context.read_kv(cache, layer, length, session.model.model.config)
            keys.append(k if k.device.type == "cpu" else _host(k))
            values.append(v if v.device.type == "cpu" else _host(v))
        for edit in reversed([] if run is None else run.kv_edits):  # the K/V as it was when the run began
            for i, position in enumerate(edit.positions):
                if position < length:
                    for held, old in ((keys, edit.old_keys), (values, edit.old_values)):
                        if old is not None:
                            held[edit.layer][:, position] = old[:, i]
        kv = {"kind": "blocks" if isinstance(cache, BlockKV) else "module", "length": length, "keys": keys,
              "values": values}
    return {
        "format": FORMAT,
        "model": session.model.id,
        "history": list(session.history if run is None else session.history[: run.context_length]),
        "kv": kv,
        "breakpoints": [replace(bp, hits=hits.get(bp.id, bp.hits)) for bp in session.breakpoints],
        "next_breakpoint": _next_id(session.breakpoints, "_ids"),
        "steering": [Steering(s.id, s.path, s.layer, s.side, _edit_to(s.edit, "cpu")) for s in session.steering.values()],
        "recordings": [replace(r) for r in session.recordings.values()],
        "saes": {path: sae.to(torch.device("cpu")) for path, sae in session.saes.items()},
        "counters": {name: _next_id(session, name) for name in _COUNTERS},
        "run": None if run is None else _run_state(run),
    }


def _run_state(run: Run) -> dict[str, Any]:
    pause = run.pause
    sampling = run.sampling
    return {
        "id": run.id,
        "prompt_ids": list(run.prompt_ids),
        "max_new_tokens": run.max_new_tokens,
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "seed": sampling.seed},
        "keep_logits": run.keep_logits,
        "answers": [(command.value, edited) for command, edited in run.answers],
        "kv_edits": list(run.kv_edits),
        "pause": {
            "number": pause.number, "path": pause.path, "layer": pause.layer, "side": pause.side,
            "token_step": pause.token_step, "reason": pause.reason, "breakpoint_ids": list(pause.breakpoint_ids),
            "original": _host(pause.original), "current": _host(pause.current), "edits": pause.edits,
        },
    }


def state_bytes(state: dict[str, Any]) -> int:
    """Device bytes the state's K/V and paused activations take once imported (what the importing engine makes
    room for; a moved run's own growth is admitted when it starts again)."""
    kv, run = state["kv"], state.get("run")
    tensors = [] if kv is None else [*kv["keys"], *kv["values"]]
    if run is not None:
        tensors += [run["pause"]["original"], run["pause"]["current"]]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def import_state(session: SessionState, state: dict[str, Any]) -> None:
    """Give the new, empty ``session`` the exported ``state`` (call with its lock held, room made for its K/V)."""
    if state.get("format") != FORMAT:
        raise InvalidArgumentError(
            f"a session state of format {state.get('format')!r} cannot be imported by this engine (format {FORMAT}); "
            f"run the same Djinn version on every engine"
        )
    loaded = session.model
    device = loaded.device
    session.history = list(state["history"])
    session.cache = _cache(loaded, state["kv"], device)
    session.breakpoints = BreakpointTable(
        {bp.id: replace(bp) for bp in state["breakpoints"]}, itertools.count(state["next_breakpoint"])
    )
    session.steering = {s.id: Steering(s.id, s.path, s.layer, s.side, _edit_to(s.edit, device)) for s in state["steering"]}
    session.recordings = {r.id: replace(r) for r in state["recordings"]}
    session.saes = {path: sae.to(device) for path, sae in state["saes"].items()}
    hooked = [*(bp.path for bp in session.breakpoints), *(s.path for s in session.steering.values()),
              *(r.path for r in session.recordings.values()), *session.saes]
    for path in dict.fromkeys(hooked):  # the hooks the source engine put on these modules when they were added
        loaded.dispatcher.ensure(path)
    for name, value in state["counters"].items():
        setattr(session, name, itertools.count(value))


def _cache(loaded: Any, kv: dict[str, Any] | None, device: torch.device) -> object | None:
    if kv is None:
        return None
    keys = [k.to(device) for k in kv["keys"]]
    values = [v.to(device) for v in kv["values"]]
    length = kv["length"]
    with torch.inference_mode():
        if kv["kind"] == "blocks" and loaded.scheduler is not None:
            blocks = BlockKV(loaded.scheduler.runner.shape)
            blocks.ensure(length)
            for layer, (k, v) in enumerate(zip(keys, values)):
                blocks.write(layer, 0, k, v)
            blocks.length = length
            return blocks
        from transformers import DynamicCache

        cache = DynamicCache(config=loaded.model.config)
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(k.unsqueeze(0), v.unsqueeze(0), layer)
        return cache
