"""Weight streaming: a model larger than its weight budget keeps as many decoder layers on the device as fit and
streams the rest, layer by layer, through a ring of device slots fed from one pinned host arena.

Decode of a model that does not fit is bound by PCIe, so the aim is to keep the copy engine busy with exactly
the bytes that must move: each streamed layer crosses once per forward, in one contiguous copy (>= 2 MB copies
reach ~50 GB/s pinned, 32 KiB ones ~2.6), while the layers before it compute. The first layers are streamed and
the last ones kept: the loads of the next forward's first layers are queued as this forward's streamed layers
finish, and copy while its resident layers compute, so the copy engine stays busy across the host's sync at the
end of a token (streaming the last layers instead would leave it idle while the host launches the resident ones).

Invariants:
- One arena, allocated (and pinned, on CUDA) at load, holds every streamed layer's parameters packed in one
  extent per layer; a slot holds one layer in the same packing, so a load is one copy and the layer's
  parameters become views of the slot (``param.data``), never copies. Parameters that view one tensor (the
  fast path's fused q/k/v and gate/up weights, runner.py) keep that tensor's layout in the extent, so the
  runner reads the fused tensor as one view of the slot.
- Loads follow execution order: the module order of the decoder layers, cyclically (after the last streamed
  layer of one forward come the first ones of the next). Whoever computes a streamed layer ``acquire``s it
  first (loading it on demand if no prefetch did), which makes the compute stream wait for its copy and points
  the parameters at the slot, and ``release``s it after: records an event after the layer's kernels and
  queues the next layer in execution order into the slot that is no longer wanted. On the module path the
  layer's forward pre-hook and forward hook do this; the fast path's layer loop calls them itself (one
  acquire and release per layer for a whole batch of sessions, so a batched step copies each layer once).
- A slot is reused only when no forward is inside the layer it holds (``readers == 0``), and its next copy is
  queued on the prefetch stream behind the events of every release of that layer: the copy never overwrites
  weights a kernel may still read. A forward paused inside a streamed layer (a breakpoint on one of its
  submodules) keeps its slot; other forwards use the rest of the ring and wait, rather than evict, if every
  slot is held.
- A forward that dies inside a layer (cancelled at a submodule's pause, or an error) never reaches its release;
  its pin belongs to its thread and is dropped at that thread's next acquire, or once the thread has ended.
- Outside a forward a streamed layer's parameters are views of its arena extent, so what a user reads there is
  the layer's own weights, not whatever a slot holds now.
- On the CPU the same bookkeeping runs with host "slots", synchronous copies and events that are complete when
  made: the tests check the order, the reuse rule and the byte counts of this very code.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InvalidArgumentError, WeightBudgetError

ALIGN = 256  # bytes: every parameter starts on a boundary the GEMM kernels like
MiB = 1 << 20


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def packed_bytes(module: nn.Module) -> int:
    """Bytes one layer takes in the arena and in a slot: the tensors its parameters view, each aligned."""
    return _layout(module).nbytes


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of each distinct tensor once (tied weights are one Parameter object)."""
    distinct = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in distinct.values())


@dataclass(frozen=True)
class StreamPlan:
    """Which decoder layers stay on the device and which pass through the ring (indices in module order)."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    slots: int
    slot_bytes: int
    other_bytes: int  # embeddings, norms, head, buffers: always on the device
    resident_bytes: int  # other_bytes plus the resident layers
    arena_bytes: int

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.slots * self.slot_bytes


def check_ring_slots(slots: object) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise InvalidArgumentError(
            f"ring_slots must be a positive integer (2 overlaps copy and compute), not {slots!r}"
        )
    return slots


def plan_split(layer_bytes: Sequence[int], other_bytes: int, budget: int, slots: int = 2) -> StreamPlan | None:
    """The split of a model into resident and streamed layers under ``budget`` device bytes, or ``None`` when the
    whole model fits. Layers are kept from the last one backwards (see the module docstring); the ring gets
    ``slots`` slots, fewer (down to one, which cannot overlap copy and compute) only when the budget leaves no
    room for them."""
    check_ring_slots(slots)
    n = len(layer_bytes)
    if other_bytes + sum(layer_bytes) <= budget:
        return None
    if n == 0:
        raise WeightBudgetError(
            f"the model's weights ({other_bytes / MiB:.1f} MiB) exceed the weight budget ({budget / MiB:.1f} MiB) "
            f"and Djinn finds no decoder-layer list to stream; raise --weight-memory to at least that size"
        )
    for ring in range(min(slots, n), 0, -1):
        for kept in range(n - 1, -1, -1):
            streamed = tuple(range(n - kept))
            slot_bytes = max(layer_bytes[i] for i in streamed)
            resident = other_bytes + sum(layer_bytes[n - kept :])
            if len(streamed) <= ring:
                continue  # as many slots as streamed layers: the layers would fit resident instead
            if resident + ring * slot_bytes <= budget:
                return StreamPlan(tuple(range(n - kept, n)), streamed, ring, slot_bytes, other_bytes, resident,
                                  sum(layer_bytes[i] for i in streamed))
    need = other_bytes + max(layer_bytes)
    raise WeightBudgetError(
        f"the weight budget ({budget / MiB:.1f} MiB) cannot hold even the embeddings, norms and head "
        f"({other_bytes / MiB:.1f} MiB) plus one ring slot for a decoder layer ({max(layer_bytes) / MiB:.1f} MiB); "
        f"raise --weight-memory (Engine(weight_memory=...)) to at least {need / MiB:.1f} MiB, better "
        f"{(other_bytes + 2 * max(layer_bytes)) / MiB:.1f} MiB for two slots, or load the model in a smaller dtype"
    )


def plan_for(model: nn.Module, layers: Sequence[nn.Module], budget: int, slots: int = 2) -> StreamPlan | None:
    """``plan_split`` from the model's own sizes; ``layers`` in module order."""
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    other = _tensor_bytes(t for t in [*model.parameters(), *model.buffers()] if id(t) not in in_layers)
    return plan_split([packed_bytes(layer) for layer in layers], other, budget, slots)


class _HostEvent:
    """An event on the CPU: the work it marks was done synchronously, so it is complete when made."""


class _HostOps:
    """Copies and events on the CPU: copies are synchronous, events complete, waits free."""

    pin = False

    def record(self) -> _HostEvent:
        return _HostEvent()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list) -> _HostEvent:
        dst.copy_(src)
        return _HostEvent()

    def wait(self, event: object) -> None:
        return None


class _CudaOps:
    """Copies on one prefetch stream, each behind the events of the compute that last read its slot."""

    pin = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list) -> torch.cuda.Event:
        ready = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            for event in after:
                self.stream.wait_event(event)
            dst.copy_(src, non_blocking=True)
            ready.record(self.stream)
        return ready

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


@dataclass
class _Slot:
    index: int
    buffer: torch.Tensor  # uint8 [slot_bytes] on the device
    layer: int | None = None  # position in the streamed order of the layer it holds (or is loading)
    ready: object = None  # event: the copy of ``layer`` into it is complete
    readers: int = 0  # forwards inside ``layer`` now
    done: list = field(default_factory=list)  # events after each release of ``layer`` since it was loaded
    consumed: bool = True  # whether a forward has acquired the current load (counts its bytes once)


@dataclass
class _Layout:
    """One streamed layer: its parameters with their byte offsets in the packed extent."""

    params: list[tuple[nn.Parameter, int, torch.Size, torch.dtype]]
    nbytes: int


def _layout(layer: nn.Module) -> _Layout:
    """Each parameter packed (aligned) in the order of first use, except that parameters which tile one storage
    exactly (the runner's fused q/k/v and gate/up tensors) are packed as that one tensor, each at its own place
    in it, so that the fused tensor stays one tensor in the arena and in the slots."""
    storages: dict[object, list[nn.Parameter]] = {}
    for p in _unique_params(layer):
        key = (p.device, p.untyped_storage().data_ptr()) if p.is_contiguous() else id(p)
        storages.setdefault(key, []).append(p)
    params, offset = [], 0
    for members in storages.values():
        for tile in [members] if _tiles(members) else [[p] for p in members]:
            low = min(p.storage_offset() for p in tile)
            itemsize = tile[0].element_size()
            params += [(p, offset + (p.storage_offset() - low) * itemsize, p.shape, p.dtype) for p in tile]
            offset += _aligned(sum(p.numel() for p in tile) * itemsize)
    return _Layout(params, offset)


def _tiles(members: list[nn.Parameter]) -> bool:
    """Whether contiguous views of one storage cover all of it, one after another (the parts of a fused tensor)."""
    end = 0
    for p in sorted(members, key=lambda p: p.storage_offset()):
        if p.storage_offset() != end:
            return False
        end += p.numel()
    return end * members[0].element_size() == members[0].untyped_storage().nbytes()


@dataclass(frozen=True)
class RingEvent:
    """One entry of the ring's log: a load into a slot, or an acquire or release of a layer held there."""

    kind: str  # "load", "acquire", "release"
    layer: int  # position in the streamed order
    slot: int
    forward: int


class WeightRing:
    """The streamed layers of one model: the arena, the slots, the hooks and the bookkeeping between them."""

    LOG = 4096

    def __init__(self, model: nn.Module, layer_paths: Sequence[str], plan: StreamPlan, device: torch.device) -> None:
        self.device = torch.device(device)
        self.plan = plan
        self.ops = _CudaOps(self.device) if self.device.type == "cuda" else _HostOps()
        self.paths = [layer_paths[i] for i in plan.streamed]
        self.layers = [model.get_submodule(path) for path in self.paths]  # in streamed order
        self._layouts = [_layout(layer) for layer in self.layers]
        self.arena = torch.empty(plan.arena_bytes, dtype=torch.uint8, pin_memory=self.ops.pin)
        self._extents: list[torch.Tensor] = []
        offset = 0
        for layout in self._layouts:
            self._extents.append(self.arena[offset : offset + layout.nbytes])
            offset += layout.nbytes
        self._arena_views = [self._views(layout, extent) for layout, extent in zip(self._layouts, self._extents)]
        for layout, extent, views in zip(self._layouts, self._extents, self._arena_views):
            for (param, *_), view in zip(layout.params, views):
                view.copy_(param.data)
                param.data = view  # the original storage is freed here (the arena holds the only copy)
        self.slots = [
            _Slot(i, torch.empty(plan.slot_bytes, dtype=torch.uint8, device=self.device)) for i in range(plan.slots)
        ]
        self._slot_views = [
            [self._views(layout, slot.buffer[: layout.nbytes]) for layout in self._layouts] for slot in self.slots
        ]
        self._holding: dict[int, _Slot] = {}
        self._pins: dict[int, tuple[threading.Thread, int]] = {}  # thread id -> (thread, streamed position)
        self._cond = threading.Condition()
        self._handles: list = []
        self.forwards = 0
        self.bytes_copied = 0
        self.loads = 0
        self.demand_loads = 0
        self._forward_bytes = 0  # bytes of the loads the current forward consumed
        self.per_forward: deque[int] = deque(maxlen=self.LOG)  # the same, for each forward that ran to its end
        self.log: deque[RingEvent] = deque(maxlen=self.LOG)

    @staticmethod
    def _views(layout: _Layout, extent: torch.Tensor) -> list[torch.Tensor]:
        return [
            extent[offset : offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
            for _, offset, shape, dtype in layout.params
        ]

    # hooks ----------------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Hook every streamed layer: the acquire runs after any other pre-hook (a pause at the layer's input
        holds no slot), the release before any other forward hook (a pause at its output holds none either)."""
        for k, path in enumerate(self.paths):
            layer = model.get_submodule(path)
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(k)))
            self._handles.append(layer.register_forward_hook(self._post_hook(k), prepend=True))
        with self._cond:
            self._prefetch(0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, k: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.acquire(k)

        return hook

    def _post_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self.release(k)

        return hook

    # the ring ---------------------------------------------------------------------------------------------
    def acquire(self, k: int) -> None:
        """Make streamed layer ``k`` computable on this thread: its slot pinned, its copy waited for, its
        parameters pointing at the slot."""
        with self._cond:
            self._drop_stale_pins()
            if k == 0:
                self.forwards += 1
                self._forward_bytes = 0
            slot = self._slot_for(k)
            slot.readers += 1
            self._pins[threading.get_ident()] = (threading.current_thread(), k)
            if not slot.consumed:
                slot.consumed = True
                self._forward_bytes += self._layouts[k].nbytes
            self.log.append(RingEvent("acquire", k, slot.index, self.forwards))
            self.ops.wait(slot.ready)
            self._point(k, self._slot_views[slot.index][k])

    def release(self, k: int) -> None:
        """Layer ``k`` has been computed on this thread: mark when its kernels end, free its slot for reuse
        behind that mark, and queue the next layers in execution order."""
        with self._cond:
            self._pins.pop(threading.get_ident(), None)
            self._unpin(k)
            if k == len(self._layouts) - 1:
                self.per_forward.append(self._forward_bytes)
            self._prefetch(k + 1)
            self._cond.notify_all()

    def _unpin(self, k: int) -> None:
        slot = self._holding[k]
        slot.done.append(self.ops.record())
        slot.readers -= 1
        self.log.append(RingEvent("release", k, slot.index, self.forwards))
        if slot.readers == 0:
            self._point(k, self._arena_views[k])

    def _drop_stale_pins(self) -> None:
        """Release the pin of this thread's forward that died inside a layer, and of threads that ended."""
        me = threading.get_ident()
        for ident, (thread, k) in list(self._pins.items()):
            if ident == me or not thread.is_alive():
                del self._pins[ident]
                self._unpin(k)

    def _slot_for(self, k: int) -> _Slot:
        """The slot holding ``k``; if none, ``k`` loaded on demand into the slot no forward reads whose layer is
        wanted last, waiting while every slot is read (another thread may load ``k`` meanwhile)."""
        m = len(self._layouts)
        while (slot := self._holding.get(k)) is None:
            free = [s for s in self.slots if s.readers == 0]
            if not free:
                self._cond.wait()
                continue
            slot = max(free, key=lambda s: -1 if s.layer is None else (s.layer - k) % m)
            self._load(slot, k)
            self.demand_loads += 1
            self._prefetch(k)
        return slot

    def _prefetch(self, start: int) -> None:
        """Fill the slots nobody reads with the layers from ``start`` on in execution order, nearest first."""
        m, ring = len(self._layouts), len(self.slots)
        wanted = [(start + i) % m for i in range(ring)]
        for layer in wanted:
            if layer in self._holding:
                continue
            spare = [s for s in self.slots if s.readers == 0 and s.layer not in wanted]
            if not spare:
                return
            self._load(spare[0], layer)

    def _load(self, slot: _Slot, k: int) -> None:
        assert slot.readers == 0, "a slot is reloaded only when no forward reads it"
        nbytes = self._layouts[k].nbytes
        ready = self.ops.copy(slot.buffer[:nbytes], self._extents[k], slot.done)  # first: a failed copy changes nothing
        if slot.layer is not None:
            del self._holding[slot.layer]
        slot.ready, slot.layer, slot.done, slot.consumed = ready, k, [], False
        self._holding[k] = slot
        self.bytes_copied += nbytes
        self.loads += 1
        self.log.append(RingEvent("load", k, slot.index, self.forwards))

    def _point(self, k: int, views: list[torch.Tensor]) -> None:
        for (param, *_), view in zip(self._layouts[k].params, views):
            param.data = view

    # reporting ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """The split and the traffic: what `djinn status` shows for a streamed model."""
        with self._cond:
            return {
                "resident_layers": list(self.plan.resident),
                "streamed_layers": list(self.plan.streamed),
                "ring_slots": len(self.slots),
                "slot_bytes": self.plan.slot_bytes,
                "arena_bytes": self.plan.arena_bytes,
                "device_bytes": self.plan.device_bytes,
                "arena_pinned": bool(self.arena.is_pinned()) if self.device.type == "cuda" else False,
                "forwards": self.forwards,
                "bytes_copied": self.bytes_copied,
                "loads": self.loads,
                "demand_loads": self.demand_loads,
                # One forward per decoded token: the bytes the last complete forward needed copied.
                "bytes_per_token": self.per_forward[-1] if self.per_forward else None,
            }


def stream_model(
    model: nn.Module, layer_paths: Sequence[str], plan: StreamPlan, device: torch.device
) -> WeightRing:
    """Put ``model`` on ``device`` except its streamed layers' parameters, which go to the ring's arena; hook them.

    The model may start on the host (a checkpoint loaded there) or on the device (built there: the streamed
    layers' device storage is freed as they move to the arena)."""
    device = torch.device(device)
    ring = WeightRing(model, layer_paths, plan, device)
    streamed = {id(p) for layout in ring._layouts for p, *_ in layout.params}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in streamed and p.device != device:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ring.install(model)
    return ring
