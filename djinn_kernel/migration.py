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
  and the paused activations themselves, and the session's configuration (breakpoints, steering, recordings,
  SAEs) as the run began, after each pause where the user changed it, and now (session_config.py). The importing
  engine runs it from its start, answers those pauses the same way with the configuration that was in effect
  there, and stops at the same pause (executor.Replay): in deterministic mode every value it computes is the
  source's, bit for bit, and the activation shown and resumed is the source's in any mode. A running run cannot
  move (it has no pause to replay to).
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
from typing import Any

import torch

from . import context, session_config
from .errors import InvalidArgumentError
from .executor import Run
from .kv_blocks import BlockKV
from .sessions import SessionState

FORMAT = 2  # bumped when the state's layout changes; an engine refuses a state of another format
_COUNTERS = ("_steer_ids", "_record_ids", "_run_ids")


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def export_state(session: SessionState, run: Run | None = None) -> dict[str, Any]:
    """The resident ``session`` (idle, or with ``run`` paused) as plain data and CPU tensors (call with its lock
    held). A paused run's session goes with the configuration the run began with, and the run with the
    configuration as it was after each pause where the user changed it, and as it is now (session_config.py)."""
    config = (session_config.snapshot(session) if run is None else run.started).moved("cpu")
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
        "config": config,
        "counters": {name: session_config.next_id(session, name) for name in _COUNTERS},
        "run": None if run is None else _run_state(run, session_config.snapshot(session)),
    }


def _run_state(run: Run, now: session_config.Config) -> dict[str, Any]:
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
        "configs": {number: config.moved("cpu") for number, config in run.configs.items()},
        "config_now": now.moved("cpu"),
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
    session_config.install(session, state["config"].moved(device))
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
