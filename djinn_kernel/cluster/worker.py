"""One engine in its own process: the Ray actor behind each GPU of a cluster (backend.py makes and calls it).

``EngineWorker`` is a plain class (Ray turns it into an actor with ``ray.remote``; it imports no Ray itself). It
holds one ``Engine`` with its own memory manager and budget, on the device Ray gave the process (with
``num_gpus=1`` Ray sets ``CUDA_VISIBLE_DEVICES``, so ``cuda`` is that GPU; on a CPU test cluster, the CPU).

Threads: the actor is threaded (``max_concurrency`` > 1), so a ``generate`` that blocks until its run pauses or
ends does not hold up a ``cancel``, ``run_snapshot`` or another session's call on the same engine; the engine is
thread-safe (engine.py). What the worker returns is host data only: tensors leave on the CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import InvalidArgumentError

# What the backend may call by name besides the engine's own public methods: nothing else of the worker or engine.
_OWN = frozenset({"load", "describe", "export"})


def _host(value: Any) -> Any:
    """``value`` with every tensor in it on the CPU (what an engine returns usually is already)."""
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "cpu" else value.to("cpu")
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    return value


class EngineWorker:
    """An ``Engine`` behind one GPU, with the calls the cluster backend makes to it."""

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        """``options``: the Engine's keyword arguments, plus the memory manager's as ``djinn serve`` takes them:
        ``gpu_memory``, ``host_memory`` and ``host_reserve`` (bytes or sizes such as ``"8GiB"``), ``page_on_pause``,
        and the disk tier's ``spill_dir`` (each engine spills to its own folder in it, ``gpu<index>``),
        ``spill_memory``, ``spill_threads`` and ``spill_block``."""
        from ..engine import Engine, default_device, default_memory
        from ..memory import LRUPolicy, parse_bytes
        from ..spill import SpillStore

        options = dict(options)

        def size(name: str, default: str | None = None) -> int | None:
            value = options.pop(name, None) or default
            return None if value is None else parse_bytes(value)

        budget, host, reserve = size("gpu_memory"), size("host_memory"), size("host_reserve")
        spill_dir, spill_memory = options.pop("spill_dir", None), size("spill_memory", "64GiB")
        threads, block = options.pop("spill_threads", 4), size("spill_block", "16MiB")
        spill = SpillStore(os.path.join(spill_dir, f"gpu{index}"), spill_memory, threads, block) if spill_dir else None
        device = torch.device(options.pop("device", None) or default_device())
        memory = default_memory(device, budget, host, spill=spill)
        if options.pop("page_on_pause", False):
            options["policy"] = LRUPolicy(eager=True)
        if reserve:
            memory.pool.reserve(reserve)
        self.index = index
        self.engine = Engine(device=device, memory=memory, **options)

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """The engine's public method ``op``. Arguments that are Ray object refs arrive resolved (a migrating
        session's state comes straight from the source engine's object store)."""
        if op.startswith("_") or op in _OWN or not callable(getattr(self.engine, op, None)):
            raise InvalidArgumentError(f"an engine has no operation {op!r}")
        return _host(getattr(self.engine, op)(*args, **kwargs))

    def export(self, sid: int) -> tuple[dict[str, int], dict[str, Any]]:
        """A session's state (``Engine.export_session``: idle, or its run paused) and, apart, its size and whether
        a paused run moves with it: the caller, which called this with two returns, reads the small one (or the
        export's error) without fetching the state itself."""
        from ..migration import state_bytes

        state = self.engine.export_session(sid)
        return {"bytes": state_bytes(state), "history_tokens": len(state["history"]),
                "paused_run": None if state["run"] is None else state["run"]["id"]}, state

    def load(self) -> dict[str, Any]:
        """What placement needs (placement.EngineLoad): the budget, each session's device bytes, the models; and
        what rebalancing needs (placement.SessionLoad): each session's bytes in all tiers and its state."""
        memory = self.engine.memory
        sessions = self.engine.sessions()
        return {
            "budget": memory.budget,
            "weights_in_budget": memory.budget_from_free_memory,
            "sessions": {s["id"]: max(s["memory"]["gpu_bytes"], s["memory"]["reserved"]) for s in sessions},
            "held": {s["id"]: sum(s["memory"].get(k, 0) for k in ("gpu_bytes", "host_bytes", "disk_bytes"))
                     for s in sessions},
            "states": {s["id"]: s["state"] for s in sessions},
            "models": [m["id"] for m in self.engine.models()],
        }

    def describe(self) -> dict[str, Any]:
        """Where this engine runs: its process, device and (under Ray) node."""
        node = None
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"index": self.index, "pid": os.getpid(), "device": str(self.engine.device), "node": node}
