"""A session's K/V in fixed-size blocks: the layout the batched decode reads in place, and that pages, forks and
rewinds block by block.

Invariants:
- Each block is its own storage, ``[layers, 2, kv_heads, block_tokens, head_dim]`` (K then V of every layer for
  ``block_tokens`` consecutive positions), so the memory manager's storage-level paging moves a session's KV as
  it moves any tensor, in copies of whole blocks (8 MiB each for a 7B Llama shape: large enough for full PCIe
  speed), and a paged block comes back at a new address with the same bytes.
- ``length`` tokens are written in every layer; positions past it are unwritten (garbage) and never read.
- The batched decode finds a row's blocks through ``pointers()``, read afresh before every step, so paging
  between steps (a session that is not in the batch) is invisible to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 32


@dataclass(frozen=True)
class KVShape:
    """What one block holds, from the model's config."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    block_tokens: int = BLOCK_TOKENS

    @property
    def block_bytes(self) -> int:
        return self.layers * 2 * self.kv_heads * self.block_tokens * self.head_dim * self.dtype.itemsize

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)


class BlockKV:
    """The K/V of one session's history, block by block (see the module docstring)."""

    def __init__(self, shape: KVShape) -> None:
        self.shape = shape
        self.blocks: list[torch.Tensor] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.shape.block_tokens

    def ensure(self, tokens: int) -> None:
        """Allocate blocks until ``tokens`` positions fit."""
        s = self.shape
        while self.capacity < tokens:
            self.blocks.append(
                torch.empty((s.layers, 2, s.kv_heads, s.block_tokens, s.head_dim), dtype=s.dtype, device=s.device)
            )

    def truncate(self, tokens: int) -> None:
        """Keep the first ``tokens`` positions; blocks wholly past them are released."""
        self.length = min(self.length, tokens)
        del self.blocks[self.shape.blocks_for(self.length) :]

    def clone(self) -> BlockKV:
        other = BlockKV(self.shape)
        other.blocks = [b.clone() for b in self.blocks[: self.shape.blocks_for(self.length)]]
        other.length = self.length
        return other

    def pointers(self) -> list[int]:
        """The blocks' addresses, for the kernels' tables. The kernels read them as 16-byte vectors, which a whole
        allocation always allows; a block that were a view at an odd offset would be read wrong, so it fails here."""
        ptrs = [b.data_ptr() for b in self.blocks]
        if any(p & 15 for p in ptrs):
            raise RuntimeError("a KV block is not 16-byte aligned: blocks must be whole allocations")
        return ptrs

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (``[kv_heads, tokens, head_dim]``) at positions ``start ...``; blocks must exist."""
        bt = self.shape.block_tokens
        done, total = 0, keys.shape[1]
        while done < total:
            pos = start + done
            block, offset = divmod(pos, bt)
            n = min(bt - offset, total - done)
            self.blocks[block][layer, 0, :, offset : offset + n] = keys[:, done : done + n]
            self.blocks[block][layer, 1, :, offset : offset + n] = values[:, done : done + n]
            done += n

    def write_at(
        self, layer: int, positions: list[int], keys: torch.Tensor | None, values: torch.Tensor | None
    ) -> None:
        """Overwrite keys and/or values (``[kv_heads, len(positions), head_dim]``) at scattered held positions."""
        for i, pos in enumerate(positions):
            block, offset = divmod(pos, self.shape.block_tokens)
            for kind, new in ((0, keys), (1, values)):
                if new is not None:
                    self.blocks[block][layer, kind, :, offset] = new[:, i]

    def read(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first ``tokens`` positions of ``layer`` as ``[kv_heads, tokens, head_dim]`` copies."""
        n = self.shape.blocks_for(tokens)
        if n == 0:
            s = self.shape
            empty = torch.empty((s.kv_heads, 0, s.head_dim), dtype=s.dtype, device=s.device)
            return empty, empty
        keys = torch.cat([b[layer, 0] for b in self.blocks[:n]], dim=1)[:, :tokens]
        values = torch.cat([b[layer, 1] for b in self.blocks[:n]], dim=1)[:, :tokens]
        return keys, values

    def to_cache(self, config: object) -> object:
        """A transformers ``DynamicCache`` holding copies of the same K/V (for a run on the module path)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        if self.length:
            for layer in range(self.shape.layers):
                keys, values = self.read(layer, self.length)
                cache.update(keys.unsqueeze(0), values.unsqueeze(0), layer)
        return cache

    @classmethod
    def from_cache(cls, shape: KVShape, cache: object, tokens: int) -> BlockKV:
        """Blocks holding the first ``tokens`` positions of a transformers cache (after a module-path run)."""
        kv = cls(shape)
        kv.ensure(tokens)
        if tokens:
            for layer, cached in enumerate(cache.layers):
                kv.write(layer, 0, cached.keys[0, :, :tokens], cached.values[0, :, :tokens])
        kv.length = tokens
        return kv
