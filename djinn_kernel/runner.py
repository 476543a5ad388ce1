"""The fast decode path: a runner that owns the decoder-layer loop of a Llama-family model.

Hugging Face's forward is built for one sequence and eager launches: at batch 1 on the H200 it spends ~8× the
time the weights take to read. The runner calls the model's own weights in its own layer loop instead, so that
many sessions decode in one batched forward (each row reading its own session's KV blocks in place), steering
is a per-row vector added at a layer's output, and on CUDA the whole step is captured as a CUDA graph per batch
size and replayed with new inputs.

Invariants:
- The runner reads the model's parameters; it never copies them. At build time the q/k/v weights (and biases)
  and gate/up weights of each layer are moved into one fused tensor each and the modules' parameters become
  views of it, so Hugging Face's modules (the debugger's module path) and the runner share one copy.
- A model whose first decoder layers stream through a weight ring (streaming.py) was fused before it was
  streamed, so each slot holds a layer in the fused layout: the layer loop acquires a streamed layer from the
  ring, reads its fused tensors as views of the slot, computes it for the whole batch and releases it. The
  streamed layers run eagerly (their slot changes from step to step, and against a layer's copy over PCIe its
  launches are negligible); the resident ones keep their CUDA graphs.
- The layer math is Hugging Face's (RMSNorm in float32, rotary halves, SiLU-gated MLP, attention scaled by
  ``head_dim ** -0.5``): on the CPU in float32 its logits agree with the module path to float rounding. Fused and
  batched GEMMs round differently in bf16, so bitwise claims belong to the module path (``deterministic``).
- A step reads everything from device buffers of fixed shape (tokens, positions, block-address tables, steering
  rows), filled before the step, and writes the layer outputs that rows record (taps.py) to a staging buffer of
  fixed shape: what a captured graph needs to be replayed with new inputs. The staged rows go to host memory
  after the step, on a side stream; the step itself never waits for the host.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kv_blocks import BlockKV, KVShape
from .streaming import WeightRing
from .taps import Outbox, Tap

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PROMPT_TILE = 64  # prompt tokens of one row that one program of the prefill attention kernel covers

# A layer's attention: (layer index, q, k, v) -> its output; it stores the new K/V where the step keeps them.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Called with (layer index, that layer's output) where a solo step may stop; returns a replacement or None.
AfterLayer = Callable[[int, torch.Tensor], "torch.Tensor | None"]

# Prompt rows a prefill overwrites after a layer: (positions among the row's fed tokens, negatives from the end,
# each once and in range: checked when the run started; values ``[len(positions), hidden]`` in the model's dtype).
RowPatch = tuple[tuple[int, ...], torch.Tensor]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the runner cannot drive this model (``None`` when it can): the Llama layer structure is required."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if config is None or layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} is not a Llama-family causal LM"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not SiLU"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"), (mlp, "gate_proj"),
                  (mlp, "up_proj"), (mlp, "down_proj"), (layer, "input_layernorm"), (layer, "post_attention_layernorm")]
        if any(getattr(owner, name, None) is None for owner, name in needed):
            return "decoder layers without the Llama attention/MLP modules"
        if hasattr(attn, "q_norm") or getattr(attn.o_proj, "bias", None) is not None:
            return "attention with query/key norms or an output bias"
    return None


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class DecodeRow:
    """One session's next token in a batched step: its KV, the token to feed, its steering by layer, and the
    layers whose output it sends to host memory (taps.py)."""

    kv: BlockKV
    token: int
    steering: dict[int, torch.Tensor] = field(default_factory=dict)
    taps: dict[int, Tap] = field(default_factory=dict)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks ``parts`` are, as one view; ``None`` when they are not that."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if (
            part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or part.storage_offset() != offset
            or not part.is_contiguous()
            or part.shape[1:] != first.shape[1:]
        ):
            return None
        offset += part.numel()
    shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
    strides = [1]
    for size in reversed(shape[1:]):
        strides.insert(0, strides[0] * size)
    return first.as_strided(shape, strides, first.storage_offset())


def _fuse(params: list[nn.Parameter], fuse: bool = True) -> torch.Tensor:
    """One tensor holding the parameters stacked by rows, each parameter a view of it: the one they view already
    (fused before, e.g. ahead of streaming), else (``fuse``) a new one they are pointed at."""
    joined = _joined(params)
    if joined is not None:
        return joined
    if not fuse:
        raise ValueError("a streamed layer's q/k/v or gate/up weights are not fused in its ring slot")
    fused = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        rows = p.shape[0]
        p.data = fused[start : start + rows]
        start += rows
    return fused


def _take(layer: nn.Module, fuse: bool = True) -> _Layer:
    """The layer's weights as the runner reads them (fused where ``fuse``, or where they already are)."""
    attn, mlp = layer.self_attn, layer.mlp
    biases = [m.bias for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    return _Layer(
        ln1=layer.input_layernorm.weight,
        ln2=layer.post_attention_layernorm.weight,
        qkv=_fuse([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], fuse),
        qkv_bias=None if biases[0] is None else _fuse(biases, fuse),
        o=attn.o_proj.weight,
        gate_up=_fuse([mlp.gate_proj.weight, mlp.up_proj.weight], fuse),
        down=mlp.down_proj.weight,
    )


def fuse_layers(model: nn.Module) -> None:
    """Fuse every decoder layer's weights as the runner does at build: before a model's layers are streamed, so
    that the ring packs each layer in the layout the runner reads (see the module docstring)."""
    with torch.no_grad():
        for layer in model.model.layers:
            _take(layer)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention_inputs(
    h: torch.Tensor, ln1: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
    sin: torch.Tensor, eps: float, heads: int, kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused q/k/v projection and rotary embedding: q ``[rows, heads, tokens, head_dim]``, k and v with
    ``kv_heads``, each contiguous (the layout the attention kernels read). Takes only tensors and constants that
    every layer shares, so one compiled copy serves all layers."""
    rows, tokens, _ = h.shape
    head_dim = cos.shape[-1]
    q, k, v = F.linear(_rms(h, ln1, eps), qkv, bias).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q = _rope(q.view(rows, tokens, heads, head_dim).transpose(1, 2), cos, sin)
    k = _rope(k.view(rows, tokens, kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = v.view(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    return q.contiguous(), k.contiguous(), v.contiguous()


def attention_output_and_mlp(
    h: torch.Tensor, attn: torch.Tensor, o: torch.Tensor, ln2: torch.Tensor, gate_up: torch.Tensor,
    down: torch.Tensor, eps: float, steer: torch.Tensor | None,
) -> torch.Tensor:
    """The rest of the layer after attention (``attn``: ``[rows, heads, tokens, head_dim]``): output projection,
    residual, norm, SiLU-gated MLP, residual, and the steering rows if any."""
    rows, tokens, _ = h.shape
    h = h + F.linear(attn.transpose(1, 2).reshape(rows, tokens, -1), o)
    gate, up = F.linear(_rms(h, ln2, eps), gate_up).chunk(2, dim=-1)
    h = h + F.linear(F.silu(gate) * up, down)
    return h if steer is None else h + steer


class Runner:
    """Prefill (one session, eager) and batched decode steps over sessions' block KV; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int = BUCKETS[-1],
        graphs: bool | None = None,
        compile: bool = True,
        ring: WeightRing | None = None,
    ) -> None:
        """On CUDA, ``graphs`` captures each decode step (default on) and ``compile`` fuses the elementwise work
        around the GEMMs with ``torch.compile`` (default on; ``warm_up`` pays for it at load). ``ring``: the
        weight ring of a model whose layers were fused (``fuse_layers``) and then streamed."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast path cannot run this model: {reason}")
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = inner.norm.variance_epsilon
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.ring = ring
        self._modules = list(inner.layers)
        in_ring = {} if ring is None else {id(layer): k for k, layer in enumerate(ring.layers)}
        # layer index -> its position in the ring's streamed order
        self.streamed = {i: in_ring[id(layer)] for i, layer in enumerate(self._modules) if id(layer) in in_ring}
        with torch.no_grad():
            # A streamed layer's weights are read from its slot at each step; checked now for the fused layout.
            self.layers = [_take(layer, fuse=i not in self.streamed) for i, layer in enumerate(self._modules)]
            for i in self.streamed:
                self.layers[i] = None
            positions = getattr(config, "max_position_embeddings", None) or 4096
            self.max_positions = positions
            cos, sin = inner.rotary_emb(weight[:1], torch.arange(positions, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        self.shape = KVShape(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)
        self.max_batch = max_batch
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            import triton  # noqa: F401 - the CUDA kernels need it: fail here, where the caller can fall back

        # The elementwise work around the GEMMs, fused by torch.compile on CUDA: one compiled copy serves every
        # layer, batch size and prompt length (dynamic shapes), in prefill and decode alike.
        fused = self.cuda and compile
        self.qkv = torch.compile(attention_inputs, dynamic=True) if fused else attention_inputs
        self.mlp = torch.compile(attention_output_and_mlp, dynamic=True) if fused else attention_output_and_mlp
        self._graphs = _CudaSteps(self, graphs if graphs is not None else True) if self.cuda else None
        self._solo: _CudaSteps | None = None  # segment graphs for steps that may stop (decode_solo)
        self.outbox = Outbox(self.device)  # tapped layer outputs to host memory (taps.py)

    def new_kv(self) -> BlockKV:
        return BlockKV(self.shape)

    def wait(self) -> None:
        """Return once the device has run what was queued on it (at once on the CPU)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _hold(self, kv: BlockKV, tokens: int) -> None:
        """Blocks for ``tokens`` positions in ``kv``, within the positions the rotary tables cover."""
        if tokens > self.max_positions:
            raise ValueError(f"{tokens} positions exceed the model's {self.max_positions}")
        kv.ensure(tokens)

    def warm_up(self) -> None:
        """Compile the prefill and capture the unsteered decode step of every batch bucket now (seconds, once
        per model), so no session pays for it when it first arrives or a batch first grows to that size.
        Nothing to do on the CPU."""
        if self._graphs is None:
            return
        scratch = [self.new_kv(), self.new_kv()]
        self.prefill([(scratch[0], [0], {})])
        self.prefill([(kv, [0] * count, {}) for kv, count in zip(scratch, (3, 2))])
        for bucket in BUCKETS:
            if bucket <= self.max_batch:
                self._graphs.prepare(bucket)

    # the layer ------------------------------------------------------------------------------------------
    def _layer(
        self,
        index: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
        steer: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decoder layer on ``h`` (``[rows, tokens, hidden]``); ``attend`` stores K/V and returns attention.
        A streamed layer is acquired from the ring around it, once for all the rows."""
        position = self.streamed.get(index)
        if position is None:
            return self._compute(self.layers[index], index, h, cos, sin, attend, steer)
        self.ring.acquire(position)
        try:
            return self._compute(_take(self._modules[index], fuse=False), index, h, cos, sin, attend, steer)
        finally:
            self.ring.release(position)

    def _compute(
        self, w: _Layer, index: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
        steer: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = self.qkv(h, w.ln1, w.qkv, w.qkv_bias, cos, sin, self.eps, self.heads, self.kv_heads)
        return self.mlp(h, attend(index, q, k, v), w.o, w.ln2, w.gate_up, w.down, self.eps, steer)

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool = False
    ) -> torch.Tensor:
        group = self.heads // self.kv_heads
        if group > 1:
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5)

    def _attend_row(
        self, kv: BlockKV, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        mask: torch.Tensor | None = None, causal: bool = False,
    ) -> torch.Tensor:
        """One row's attention in the eager steps: store its new K/V (``[kv_heads, tokens, head_dim]``) at
        ``start`` and attend ``q`` (``[1, heads, tokens, head_dim]``) over the ``start`` held before and them."""
        keys, values = k, v
        if start:
            past_k, past_v = kv.read(layer, start)
            keys, values = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        kv.write(layer, start, k, v)
        return self._attention(q, keys.unsqueeze(0), values.unsqueeze(0), mask, causal)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms(h, self.norm.weight, self.eps), self.head.weight)

    # prefill --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        rows: list[tuple[BlockKV, list[int], dict[int, torch.Tensor]]],
        after_layer: AfterLayer | None = None,
        taps: list[dict[int, Tap]] | None = None,
        patches: list[dict[int, list[RowPatch]]] | None = None,
    ) -> torch.Tensor:
        """Feed each row's tokens after the ``kv.length`` its session holds, all rows packed into one sequence
        (the GEMMs run once over every new token); the last position's logits of each row, ``[rows, vocab]``.
        ``patches``, one dict per row: the rows of its tokens each layer's output gets overwritten at, in order
        (activation patching; before the next layer, ``after_layer`` and the taps see them). ``after_layer``
        (one row only) sees every layer's output and may replace it. ``taps``, one dict per row: the layers
        whose output (as ``after_layer`` left it) each row sends to host memory, sent as each layer ends (the
        eager prefill's layer output is a fresh tensor: it is its own staging)."""
        starts = [kv.length for kv, _, _ in rows]
        counts = [len(ids) for _, ids, _ in rows]
        for (kv, _, _), start, count in zip(rows, starts, counts):
            self._hold(kv, start + count)
        dev = self.device
        ends = torch.tensor(counts).cumsum(0).tolist()
        h = self.embed(torch.tensor([[t for _, ids, _ in rows for t in ids]], device=dev))
        pos = torch.tensor([p for start, count in zip(starts, counts) for p in range(start, start + count)], device=dev)
        cos, sin = self.cos[pos], self.sin[pos]
        kvs = [kv for kv, _, _ in rows]
        attend = self._prompt_kernels(kvs, starts, counts, pos) if self.cuda else self._prompt_reference(kvs, starts, counts)
        # Each distinct set of kept positions goes to the device once, here, not at every tapped layer.
        keeps = {tuple(t.keep) for row in taps or () for t in row.values() if t.keep is not None}
        kept = {keep: torch.tensor(keep, device=dev) for keep in keeps}
        for index in range(len(self.layers)):
            steer = None
            if any(index in steering for _, _, steering in rows):
                steer = torch.zeros_like(h)
                for (_, _, steering), end, count in zip(rows, ends, counts):
                    if index in steering:
                        steer[0, end - count : end] = steering[index]
            h = self._layer(index, h, cos, sin, attend, steer)
            for row, end, count in zip(patches or (), ends, counts):
                for positions, values in row.get(index, ()):
                    h[0, [end - count + p % count for p in positions]] = values
            if after_layer is not None:
                h = _replaced(h, after_layer(index, h))
            if taps is not None:
                self.outbox.send([
                    (_kept_rows(h[0, end - count : end], row[index], kept), row[index])
                    for row, end, count in zip(taps, ends, counts)
                    if index in row
                ])
        for kv, start, count in zip(kvs, starts, counts):
            kv.length = start + count
        return self._logits(h[0, [end - 1 for end in ends]])

    def _prompt_reference(self, kvs: list[BlockKV], starts: list[int], counts: list[int]) -> Attend:
        """Prefill attention row by row with SDPA over copies of each row's blocks (the CPU's, and the
        reference the CUDA kernels are tested against)."""
        dev = self.device
        ends = torch.tensor(counts).cumsum(0).tolist()
        # A fresh row attends causally within itself (SDPA's causal kernels); a continued one needs the offset mask.
        masks = [
            None if count == 1 or start == 0
            else torch.arange(start + count, device=dev)[None, :] <= torch.arange(start, start + count, device=dev)[:, None]
            for start, count in zip(starts, counts)
        ]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = []
            for kv, start, end, count, mask in zip(kvs, starts, ends, counts, masks):
                span = slice(end - count, end)
                causal = start == 0 and count > 1
                out.append(self._attend_row(kv, layer, start, q[:, :, span], k[0, :, span], v[0, :, span], mask, causal))
            return torch.cat(out, dim=2)

        return attend

    def _prompt_kernels(self, kvs: list[BlockKV], starts: list[int], counts: list[int], pos: torch.Tensor) -> Attend:
        """Prefill attention on CUDA: each layer stores every new token's K/V in its row's blocks (one launch),
        then attends all of them over the blocks in place (one launch), whatever the rows' lengths."""
        from . import kernels

        tables = [kv.pointers() for kv in kvs]
        ptrs = torch.zeros((len(kvs), max(len(t) for t in tables)), dtype=torch.long)
        for r, table in enumerate(tables):
            ptrs[r, : len(table)] = torch.tensor(table)
        ptrs = ptrs.to(self.device)
        token_ptrs = ptrs[torch.repeat_interleave(torch.arange(len(kvs)), torch.tensor(counts)).to(self.device)]
        tiles = torch.tensor(kernels.prompt_tiles(starts, counts, PROMPT_TILE), device=self.device)
        block = self.shape.block_tokens

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kernels.store_kv(k[0].transpose(0, 1), v[0].transpose(0, 1), token_ptrs, pos, layer, block)
            return kernels.attend_prompt(q, ptrs, tiles, layer, self.kv_heads, block, PROMPT_TILE)

        return attend

    # decode ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, rows: list[DecodeRow]) -> torch.Tensor:
        """One token for every row in one batched forward; logits ``[rows, vocab]``. Each row's KV grows by one."""
        if not 0 < len(rows) <= self.max_batch:
            raise ValueError(f"a decode step takes 1 to {self.max_batch} rows, not {len(rows)}")
        for row in rows:
            self._hold(row.kv, row.kv.length + 1)
        logits = self._graphs.step(rows) if self._graphs is not None else self._decode_eager(rows)
        for row in rows:
            row.kv.length += 1
        return logits

    @torch.inference_mode()
    def decode_solo(
        self, row: DecodeRow, stops: set[int], after_layer: AfterLayer, stepping: Callable[[], bool] = lambda: False
    ) -> torch.Tensor:
        """One token for one row that may stop after the layers in ``stops`` (after every layer while
        ``stepping()``): ``after_layer`` runs there, between CUDA-graph spans cut at those layers, and may
        replace the layer's output (on the CPU it runs after every layer and decides itself). It runs on the
        caller's thread, apart from the batch; logits ``[1, vocab]``."""
        self._hold(row.kv, row.kv.length + 1)
        if self._graphs is None:
            logits = self._decode_eager([row], after_layer)
        else:
            if self._solo is None:
                self._solo = _CudaSteps(self, self._graphs.use_graphs, max_rows=1)
            logits = self._solo.segments(row, stops, after_layer, stepping)
        row.kv.length += 1
        return logits

    def _decode_eager(self, rows: list[DecodeRow], after_layer: AfterLayer | None = None) -> torch.Tensor:
        """The reference step (CPU): batched GEMMs, attention row by row over copies of each row's blocks."""
        positions = [row.kv.length for row in rows]
        pos = torch.tensor(positions, device=self.device)
        h = self.embed(torch.tensor([[row.token] for row in rows], device=self.device))
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [self._attend_row(row.kv, layer, positions[b], q[b : b + 1], k[b], v[b]) for b, row in enumerate(rows)]
            )

        for index in range(len(self.layers)):
            h = self._layer(index, h, cos, sin, attend, _steer_rows(rows, index, self.hidden, h))
            if after_layer is not None:
                h = _replaced(h, after_layer(index, h))
            self.outbox.send([(h[b], row.taps[index]) for b, row in enumerate(rows) if index in row.taps])
        return self._logits(h[:, -1])


def pieces(first: int, last: int, streamed: Collection[int]) -> list[tuple[int, int, bool]]:
    """Layers ``first..last`` cut where they pass between ``streamed`` and resident ones: ``(lo, hi, streamed)``
    in order. An empty span (only the logits remain) is one resident piece."""
    if first > last:
        return [(first, last, False)]
    out = []
    for layer in range(first, last + 1):
        kind = layer in streamed
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], layer, kind)
        else:
            out.append((layer, layer, kind))
    return out


def _replaced(h: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
    """The layer output after a stop: unchanged, or the edited value (same shape, dtype and device)."""
    if new is None:
        return h
    if new.shape != h.shape or new.dtype != h.dtype or new.device != h.device:
        raise ValueError(f"an edited activation must keep shape {tuple(h.shape)} and dtype {h.dtype}")
    return new


def _kept_rows(h: torch.Tensor, tap: Tap, kept: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    """The rows of one prompt's layer output ``h`` (``[tokens, hidden]``) that ``tap`` keeps (``kept``: the kept
    positions as device indices)."""
    return h if tap.keep is None else h.index_select(0, kept[tuple(tap.keep)])


def _steer_rows(rows: list[DecodeRow], layer: int, hidden: int, like: torch.Tensor) -> torch.Tensor | None:
    """``[rows, 1, hidden]`` of each row's vector at ``layer`` (zeros for rows without one); ``None`` if no row
    steers there."""
    if not any(layer in row.steering for row in rows):
        return None
    out = torch.zeros((len(rows), 1, hidden), dtype=like.dtype, device=like.device)
    for b, row in enumerate(rows):
        if layer in row.steering:
            out[b, 0] = row.steering[layer]
    return out


class _CudaSteps:
    """Decode steps on CUDA: Triton attention over block tables, inputs in fixed device buffers, and each span of
    layers captured as a graph per (batch bucket, steered layers, first layer, last layer) and replayed.

    A whole step is one span. A step that may stop (``segments``) is cut into spans at its stops; the hidden
    state crosses a cut in a fixed buffer (the cut costs a replay boundary, ~0.05 ms measured on the H200).
    A tapped layer (taps.py) writes the whole batch's output to its rows of a fixed staging buffer inside the
    graph, keyed by the tapped layers like steering; after the span only the rows that tap it go to the host.
    Within a span, the layers a weight ring streams run eagerly between the graphs of the resident ones
    (``pieces``): a graph bakes the addresses of the weights it reads, and a streamed layer's slot changes.
    """

    def __init__(self, runner: Runner, graphs: bool, max_rows: int | None = None) -> None:
        from . import kernels

        self.kernels = kernels
        self.runner = runner
        self.use_graphs = graphs
        r = runner
        self.max_blocks = math.ceil(r.max_positions / r.shape.block_tokens)
        self.rows = n = max_rows or r.max_batch
        dev = r.device
        # One pinned host buffer and its device twin hold every step input (tokens, positions, lengths, block
        # tables), so a step costs one host-to-device copy; the host side is filled through numpy views.
        self.host = torch.zeros(n * (3 + self.max_blocks), dtype=torch.long, pin_memory=True)
        self.device_inputs = self.host.to(dev)
        self.fields = self._views(self.host.numpy(), n)
        self.inputs = self._views(self.device_inputs, n)
        self.steer = torch.zeros((len(r.layers), n, 1, r.hidden), dtype=r.dtype, device=dev)
        # A span reads the hidden state from one buffer and writes it to another: its warm-up runs (before
        # capture) then see the same input each time, so they recompute the same K/V instead of feeding on
        # their own output.
        self.hidden_in = torch.zeros((n, 1, r.hidden), dtype=r.dtype, device=dev)
        self.hidden_out = torch.zeros((n, 1, r.hidden), dtype=r.dtype, device=dev)
        self.scratch = r.new_kv()
        self.scratch.ensure(1)
        self.staging: torch.Tensor | None = None  # [layers, rows, hidden], made when a step first taps a layer
        self.sent: torch.cuda.Event | None = None  # the copies that read the staging buffer last
        self.graphs: dict[tuple[object, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.lock = threading.Lock()  # one user of the buffers at a time (solo steps come from several threads)

    def prepare(self, bucket: int) -> None:
        """Capture the bucket's unsteered step over padding rows only (they write to the scratch block)."""
        with torch.inference_mode():
            self._fill([], bucket)
            self._span(bucket, (), (), 0, len(self.runner.layers) - 1, True)
        torch.cuda.synchronize(self.runner.device)

    def step(self, rows: list[DecodeRow]) -> torch.Tensor:
        bucket = next(b for b in BUCKETS if b >= len(rows))
        steered = self._fill(rows, bucket)
        tapped = self._stage({layer for row in rows for layer in row.taps})
        logits = self._span(bucket, steered, tapped, 0, len(self.runner.layers) - 1, True)[: len(rows)]
        self._send([(self.staging[i, b : b + 1], tap) for b, row in enumerate(rows) for i, tap in row.taps.items()])
        return logits

    def segments(
        self, row: DecodeRow, stops: set[int], after_layer: AfterLayer, stepping: Callable[[], bool]
    ) -> torch.Tensor:
        """One row's step cut after each layer in ``stops`` (after every layer while ``stepping()``), where
        ``after_layer`` runs outside the lock (it may block for as long as a pause lasts); logits ``[1, vocab]``.
        A tapped layer inside a span is sent from the staging buffer before the lock is let go (another solo step
        may write it next); one that ends a cut span is sent after ``after_layer``, as it left it."""
        layers = len(self.runner.layers)
        first, h = 0, None
        while True:
            if first == layers:
                last, ends = layers - 1, True  # the last layer was a stop: only the logits remain
            else:
                last = first if stepping() else min((i for i in stops if i >= first), default=layers - 1)
                ends = not (stepping() or last in stops)
            with self.lock:
                steered = self._fill([row], 1)
                inside = self._stage({i for i in row.taps if first <= i <= last and (ends or i != last)})
                if first > 0:
                    self.hidden_in[:1].copy_(h)
                out = self._span(1, steered, inside, first, last, ends).clone()
                self._send([(self.staging[i, :1], row.taps[i]) for i in inside])
            if ends:
                return out
            h = _replaced(out, after_layer(last, out))
            if last in row.taps:
                self.runner.outbox.send([(h[:, 0], row.taps[last])])
            first = last + 1

    def _views(self, buffer, n: int) -> dict[str, object]:
        """Contiguous views of the step inputs inside one flat buffer (numpy on the host, a tensor on the device)."""
        return {
            "tokens": buffer[:n],
            "pos": buffer[n : 2 * n],
            "lens": buffer[2 * n : 3 * n],
            "ptrs": buffer[3 * n :].reshape(n, self.max_blocks),
        }

    def _fill(self, rows: list[DecodeRow], bucket: int) -> tuple[int, ...]:
        """Write the rows' inputs (and steering rows) to the device buffers; returns the steered layers."""
        f = self.fields
        f["ptrs"][:bucket, 0] = self.scratch.pointers()[0]
        f["pos"][:bucket] = 0
        f["lens"][:bucket] = 1
        f["tokens"][:bucket] = 0
        for b, row in enumerate(rows):
            pointers = row.kv.pointers()
            f["ptrs"][b, : len(pointers)] = pointers
            f["pos"][b] = row.kv.length
            f["lens"][b] = row.kv.length + 1
            f["tokens"][b] = row.token
        used = 3 * self.rows + bucket * self.max_blocks
        self.device_inputs[:used].copy_(self.host[:used], non_blocking=True)
        steered = tuple(sorted({layer for row in rows for layer in row.steering}))
        for layer in steered:
            self.steer[layer, :bucket].zero_()
            for b, row in enumerate(rows):
                if layer in row.steering:
                    self.steer[layer, b, 0] = row.steering[layer]
        return steered

    def _stage(self, layers: set[int]) -> tuple[int, ...]:
        """The tapped ``layers`` in order, once their staging rows may be written: the buffer is made on first
        use, and the compute stream waits for the copies that read it last (on the device, not the host)."""
        if not layers:
            return ()
        r = self.runner
        if self.staging is None:
            self.staging = torch.zeros((len(r.layers), self.rows, r.hidden), dtype=r.dtype, device=r.device)
        if self.sent is not None:
            torch.cuda.current_stream(r.device).wait_event(self.sent)
        return tuple(sorted(layers))

    def _send(self, pairs: list[tuple[torch.Tensor, Tap]]) -> None:
        done = self.runner.outbox.send(pairs)
        if done is not None:
            self.sent = done

    def _span(
        self, bucket: int, steered: tuple[int, ...], tapped: tuple[int, ...], first: int, last: int, ends: bool
    ) -> torch.Tensor:
        if not self.use_graphs:
            return self._layers(bucket, steered, tapped, first, last, ends)
        out = None
        for lo, hi, streamed in pieces(first, last, self.runner.streamed):
            if out is not None:
                self.hidden_in[:bucket].copy_(out)
            done = ends and hi == last
            mine = tuple(layer for layer in steered if lo <= layer <= hi)
            taps = tuple(layer for layer in tapped if lo <= layer <= hi)
            if streamed:
                out = self._layers(bucket, mine, taps, lo, hi, done)
                continue
            key = (bucket, mine, taps, lo, hi, done)
            if key not in self.graphs:
                self.graphs[key] = self._capture(lambda: self._layers(bucket, mine, taps, lo, hi, done))
            graph, out = self.graphs[key]
            graph.replay()
        return out

    def _layers(
        self, bucket: int, steered: tuple[int, ...], tapped: tuple[int, ...], first: int, last: int, ends: bool
    ) -> torch.Tensor:
        """Layers ``first..last`` from the token embeddings (``first == 0``) or the hidden buffer, the outputs of
        the ``tapped`` ones staged; the logits when ``ends``, else the output buffer holding the last layer's
        output."""
        r, k = self.runner, self.kernels
        tokens, pos = self.inputs["tokens"][:bucket], self.inputs["pos"][:bucket]
        lens, ptrs = self.inputs["lens"][:bucket], self.inputs["ptrs"][:bucket]
        block = r.shape.block_tokens
        h = r.embed(tokens)[:, None] if first == 0 else self.hidden_in[:bucket]
        cos, sin = r.cos[pos][:, None, None], r.sin[pos][:, None, None]

        def attend(layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            k.store_kv(keys[:, :, 0], values[:, :, 0], ptrs, pos, layer, block)
            return k.attend(q[:, :, 0], ptrs, lens, layer, r.kv_heads, block)[:, :, None]

        for index in range(first, last + 1):
            steer = self.steer[index, :bucket] if index in steered else None
            h = r._layer(index, h, cos, sin, attend, steer)
            if index in tapped:
                self.staging[index, :bucket].copy_(h[:, 0])
        if ends:
            return r._logits(h[:, -1])
        self.hidden_out[:bucket].copy_(h)
        return self.hidden_out[:bucket]

    def _capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (kernel compilation, allocator), then capture one replayable span."""
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.pool = graph.pool()
        return graph, out
