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

DECODE_PAGES = 4  # blocks a decode attention program reads per iteration (bench_attention.py on the H200: with
# split_count's splits, 1.0-1.4x the KV's floor from 1 to 32 rows of 2,048 tokens; 1 and 2 up to 1.6x)
PROMPT_PAGES = 1  # the same for the prefill attention's key tiles (2 and 4 were 3-55% slower)


@triton.jit
def _store_kv(
    K, V, PTRS, POS, layer_offset, value_offset, max_blocks, token_stride, head_stride,
    KV_HEADS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program per (token, kv head); token ``i`` goes to position ``POS[i]`` of the blocks in ``PTRS[i]``."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(POS + token)
    block = pos // BLOCK
    offset = pos % BLOCK
    base = tl.load(PTRS + token * max_blocks + block).to(tl.pointer_type(K.dtype.element_ty))
    d = tl.arange(0, HEAD_DIM)
    src = token * token_stride + head * head_stride + d
    dst = base + layer_offset + (head * BLOCK + offset) * HEAD_DIM + d
    tl.store(dst, tl.load(K + src))
    tl.store(dst + value_offset, tl.load(V + src))


@triton.jit
def _attend_blocks(
    q, qpos, PTRS, row, kv_head, first, stop, step, layer_offset, value_offset, max_blocks, scale,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PAGES: tl.constexpr,
):
    """Online-softmax attention of the queries ``q`` (at positions ``qpos``, each seeing the positions up to its
    own) over block groups ``first, first + step, ... < stop`` of ``row`` (group ``g``: blocks ``g * PAGES`` to
    ``g * PAGES + PAGES - 1``): the running max, the sum of weights and the unnormalised output. Every kernel
    below reads blocks through this loop. A group's blocks are loaded at once (each token row through its
    block's address): ``PAGES`` independent reads in flight per iteration instead of one dependent chain."""
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK * PAGES)
    slot = t % BLOCK
    last = tl.max(qpos, 0)
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    total = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], HEAD_DIM], tl.float32)
    for g in range(first, stop, step):
        kpos = g * (BLOCK * PAGES) + t
        held = kpos <= last  # slots past the newest token hold nothing yet (nor blocks past the row's): never read
        base = tl.load(PTRS + row * max_blocks + kpos // BLOCK, mask=held, other=0).to(tl.pointer_type(q.dtype))
        # Blocks are whole allocations, so 16-byte aligned (checked by BlockKV.pointers): without this hint Triton
        # knows nothing of a loaded address and reads K/V 2 bytes at a time, 3.5x slower than 16-byte vectors
        # that it also pipelines through shared memory (cp.async).
        base = tl.multiple_of(base, 16)
        at = base[:, None] + layer_offset + (kv_head * BLOCK + slot[:, None]) * HEAD_DIM + d[None, :]
        k = tl.load(at, mask=held[:, None], other=0.0)
        v = tl.load(at + value_offset, mask=held[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    return m, total, acc


@triton.jit
def _attend(
    Q, O, PTRS, LENS, layer_offset, value_offset, max_blocks, scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PAGES: tl.constexpr,
):
    """One query token per row; one program per (row, kv head) covers that head's group of query heads."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    n = tl.load(LENS + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    live = g < GROUP
    q_rows = row * HEADS + kv_head * GROUP + g
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    qpos = tl.zeros([GROUP_PAD], tl.int32) + (n - 1)
    m, total, acc = _attend_blocks(
        q, qpos, PTRS, row, kv_head, 0, tl.cdiv(n, BLOCK * PAGES), 1, layer_offset, value_offset, max_blocks, scale,
        BLOCK, HEAD_DIM, PAGES,
    )
    out = acc / total[:, None]
    tl.store(O + q_rows[:, None] * HEAD_DIM + d[None, :], out.to(O.dtype.element_ty), mask=live[:, None])


@triton.jit
def _attend_part(
    Q, PART, STATS, PTRS, LENS, layer_offset, value_offset, max_blocks, scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PAGES: tl.constexpr, SPLITS: tl.constexpr,
):
    """``_attend`` over every ``SPLITS``-th block group from ``split`` on: unnormalised partial sums for
    ``_combine``."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(LENS + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    live = g < GROUP
    q_rows = row * HEADS + kv_head * GROUP + g
    q = tl.load(Q + q_rows[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    qpos = tl.zeros([GROUP_PAD], tl.int32) + (n - 1)
    m, total, acc = _attend_blocks(
        q, qpos, PTRS, row, kv_head, split, tl.cdiv(n, BLOCK * PAGES), SPLITS, layer_offset, value_offset,
        max_blocks, scale, BLOCK, HEAD_DIM, PAGES,
    )
    slot = q_rows * SPLITS + split
    tl.store(PART + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=live[:, None])
    tl.store(STATS + slot * 2, m, mask=live)
    tl.store(STATS + slot * 2 + 1, total, mask=live)


@triton.jit
def _attend_prompt(
    Q, O, PTRS, TILES, layer_offset, value_offset, max_blocks, scale, head_stride,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, PAGES: tl.constexpr,
):
    """Causal attention of packed prompt tokens over their rows' blocks (which already hold them): one program
    per (tile of up to ``TILE`` consecutive tokens of one row, query head). ``TILES[i]`` is (row, packed index
    of the tile's first token, tokens in the tile, position of the first)."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(TILES + tile * 4)
    first = tl.load(TILES + tile * 4 + 1)
    count = tl.load(TILES + tile * 4 + 2)
    pos0 = tl.load(TILES + tile * 4 + 3)
    i = tl.arange(0, TILE)
    d = tl.arange(0, HEAD_DIM)
    live = i < count
    at = head * head_stride + (first + i[:, None]) * HEAD_DIM + d[None, :]
    q = tl.load(Q + at, mask=live[:, None], other=0.0)
    qpos = pos0 + tl.where(live, i, count - 1)  # padding queries copy the last one; they are not stored
    m, total, acc = _attend_blocks(
        q, qpos, PTRS, row, head // GROUP, 0, (pos0 + count - 1) // (BLOCK * PAGES) + 1, 1, layer_offset,
        value_offset, max_blocks, scale, BLOCK, HEAD_DIM, PAGES,
    )
    out = acc / total[:, None]
    tl.store(O + at, out.to(O.dtype.element_ty), mask=live[:, None])


@triton.jit
def _combine(PART, STATS, O, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge one query head's partial sums (a split that saw no block has ``m = -inf`` and weighs nothing)."""
    head = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    m = tl.load(STATS + (head * SPLITS + s) * 2)
    total = tl.load(STATS + (head * SPLITS + s) * 2 + 1)
    top = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    acc = tl.load(PART + (head * SPLITS + s[:, None]) * HEAD_DIM + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(total * w, 0)
    tl.store(O + head * HEAD_DIM + d, out.to(O.dtype.element_ty))


def store_kv(
    keys: torch.Tensor, values: torch.Tensor, ptrs: torch.Tensor, pos: torch.Tensor, layer: int, block: int
) -> None:
    """Write ``keys``/``values`` (``[tokens, kv_heads, head_dim]``, any strides but the last) of each token at
    its ``pos`` in the blocks of its row of ``ptrs``."""
    tokens, kv_heads, head_dim = keys.shape
    per_kind = kv_heads * block * head_dim
    _store_kv[(tokens, kv_heads)](
        keys, values, ptrs, pos, layer * 2 * per_kind, per_kind, ptrs.shape[1], keys.stride(0), keys.stride(1),
        KV_HEADS=kv_heads, BLOCK=block, HEAD_DIM=head_dim,
    )


def attend(
    q: torch.Tensor, ptrs: torch.Tensor, lens: torch.Tensor, layer: int, kv_heads: int, block: int,
    splits: int | None = None, pages: int = DECODE_PAGES,
) -> torch.Tensor:
    """Attention of one query per row (``q``: ``[rows, heads, head_dim]``) over each row's first ``lens`` tokens,
    ``pages`` blocks per iteration; split over block groups (flash-decoding) when there are too few (row, kv
    head) pairs to fill the GPU. ``splits`` overrides ``split_count`` (benchmarks)."""
    rows, heads, head_dim = q.shape
    group = heads // kv_heads
    per_kind = kv_heads * block * head_dim
    out = torch.empty_like(q)
    common = dict(HEADS=heads, KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
                  BLOCK=block, HEAD_DIM=head_dim)
    args = (ptrs, lens, layer * 2 * per_kind, per_kind, ptrs.shape[1], head_dim**-0.5)
    splits = splits or split_count(rows * kv_heads)
    if splits == 1:
        _attend[(rows, kv_heads)](q, out, *args, **common, PAGES=pages)
        return out
    part = torch.empty((rows * heads * splits, head_dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((rows * heads * splits, 2), dtype=torch.float32, device=q.device)
    _attend_part[(rows, kv_heads, splits)](q, part, stats, *args, **common, PAGES=pages, SPLITS=splits)
    _combine[(rows * heads,)](part, stats, out, SPLITS=splits, HEAD_DIM=head_dim)
    return out


def attend_prompt(
    q: torch.Tensor, ptrs: torch.Tensor, tiles: torch.Tensor, layer: int, kv_heads: int, block: int, tile: int,
    pages: int = PROMPT_PAGES,
) -> torch.Tensor:
    """Causal attention of a packed prompt (``q``: ``[1, heads, tokens, head_dim]``, contiguous) over its rows'
    blocks, by the ``tiles`` of ``prompt_tiles``; the output in ``q``'s layout."""
    _, heads, tokens, head_dim = q.shape
    per_kind = kv_heads * block * head_dim
    out = torch.empty_like(q)
    _attend_prompt[(tiles.shape[0], heads)](
        q, out, ptrs, tiles, layer * 2 * per_kind, per_kind, ptrs.shape[1], head_dim**-0.5, tokens * head_dim,
        GROUP=heads // kv_heads, BLOCK=block, HEAD_DIM=head_dim, TILE=tile, PAGES=pages,
    )
    return out


def prompt_tiles(starts: list[int], counts: list[int], tile: int) -> list[tuple[int, int, int, int]]:
    """The (row, packed index, tokens, first position) of each tile of at most ``tile`` consecutive tokens of
    one row, for rows packed in order with ``counts`` new tokens after ``starts`` held ones."""
    tiles, packed = [], 0
    for row, (start, count) in enumerate(zip(starts, counts)):
        for offset in range(0, count, tile):
            tiles.append((row, packed + offset, min(tile, count - offset), start + offset))
        packed += count
    return tiles


def split_count(programs: int, target: int = 256) -> int:
    """Splits of each row's block groups so that a small batch still fills the GPU (132 SMs on an H100/H200):
    one program per (row, kv head) leaves most of them idle below ``target`` programs, where attention is then
    latency-bound (bench_attention.py on the H200, 2,048-token rows: 4 rows unsplit took 2.3x as long as split
    in two)."""
    if programs >= target:
        return 1
    return min(16, triton.next_power_of_2(-(-target // programs)))
