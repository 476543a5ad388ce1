"""Triton kernels of the fast decode path (CUDA only): K/V stores and attention that read a session's blocks in
place through a per-row table of block addresses.

A row's blocks are separate storages (see kv_blocks.py), so the kernels take their addresses, not indices into
one pool: the table is rebuilt before every step, which is what lets the memory manager page a session between
steps. Everything a kernel reads is a device tensor of fixed shape, so a step that calls them can be captured
in a CUDA graph and replayed with new tables.

Block layout, per block: ``[layers, 2, kv_heads, block_tokens, head_dim]``; layer ``l``'s keys start at element
``l * 2 * kv_heads * block_tokens * head_dim`` and its values one ``kv_heads * block_tokens * head_dim`` later.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv(
    K, V, PTRS, POS, layer_offset, value_offset, max_blocks,
    KV_HEADS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(POS + row)
    block = pos // BLOCK
    offset = pos % BLOCK
    base = tl.load(PTRS + row * max_blocks + block).to(tl.pointer_type(K.dtype.element_ty))
    d = tl.arange(0, HEAD_DIM)
    src = (row * KV_HEADS + head) * HEAD_DIM + d
    dst = base + layer_offset + (head * BLOCK + offset) * HEAD_DIM + d
    tl.store(dst, tl.load(K + src))
    tl.store(dst + value_offset, tl.load(V + src))


@triton.jit
def _attend(
    Q, O, PTRS, LENS, layer_offset, value_offset, max_blocks, scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One query token per row; one program per (row, kv head) covers that head's group of query heads."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    n = tl.load(LENS + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK)
    live = g < GROUP
    q_rows = row * HEADS + kv_head * GROUP + g
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, tl.cdiv(n, BLOCK)):
        base = tl.load(PTRS + row * max_blocks + i).to(tl.pointer_type(Q.dtype.element_ty))
        valid = i * BLOCK + t < n
        at = base + layer_offset + (kv_head * BLOCK + t[:, None]) * HEAD_DIM + d[None, :]
        k = tl.load(at, mask=valid[:, None], other=0.0)
        v = tl.load(at + value_offset, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / total[:, None]
    tl.store(O + q_rows[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty), mask=live[:, None])


def store_kv(
    keys: torch.Tensor, values: torch.Tensor, ptrs: torch.Tensor, pos: torch.Tensor, layer: int, block: int
) -> None:
    """Write one token's ``keys``/``values`` (``[rows, kv_heads, head_dim]``) at each row's ``pos``."""
    rows, kv_heads, head_dim = keys.shape
    per_kind = kv_heads * block * head_dim
    _store_kv[(rows, kv_heads)](
        keys, values, ptrs, pos, layer * 2 * per_kind, per_kind, ptrs.shape[1],
        KV_HEADS=kv_heads, BLOCK=block, HEAD_DIM=head_dim,
    )


def attend(q: torch.Tensor, ptrs: torch.Tensor, lens: torch.Tensor, layer: int, kv_heads: int, block: int) -> torch.Tensor:
    """Attention of one query per row (``q``: ``[rows, heads, head_dim]``) over each row's first ``lens`` tokens."""
    rows, heads, head_dim = q.shape
    group = heads // kv_heads
    per_kind = kv_heads * block * head_dim
    out = torch.empty_like(q)
    _attend[(rows, kv_heads)](
        q, out, ptrs, lens, layer * 2 * per_kind, per_kind, ptrs.shape[1], head_dim**-0.5,
        HEADS=heads, KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK=block, HEAD_DIM=head_dim,
    )
    return out
