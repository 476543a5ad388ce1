"""A session's context: the tokens it has seen and the KV cache that holds them, kept across runs.

Invariants:
- ``history`` is every token of the conversation so far (prompts and generated tokens, in order); the cache
  holds K/V for the first ``cached_length(cache)`` of them. The rest (at least the last generated token, which
  no forward has consumed yet) are *pending*: the next run feeds them before its new prompt tokens.
- A run that was cancelled or failed mid-forward may leave layers of different lengths (the layers before the
  stop saw one more token). ``trim`` crops every layer to the shortest, which makes the cache consistent again
  and only turns a few tokens back into pending ones; nothing in ``history`` is lost.
- ``trim``, ``clone`` and the conversions create views or copies of the cache tensors, so they run only while
  the session is resident (inside ``MemoryManager.resident`` or after ``admit``); the length functions read
  shapes alone and are safe on a paged cache.
- The cache is a transformers cache (the module path) or a ``BlockKV`` (the fast path); every function here
  takes either, and a run converts it to the kind its path reads (``for_module_path`` / ``for_fast_path``).
"""

from __future__ import annotations

import copy

import torch

from .errors import InvalidArgumentError
from .kv_blocks import BlockKV, KVShape

_SENTINEL = "DJINNREPLYSENTINEL"


def tensors(cache: object | None) -> list[torch.Tensor]:
    """The device tensors holding the cache's K/V (what the memory manager pages)."""
    if isinstance(cache, BlockKV):
        return list(cache.blocks)
    out = []
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def layer_lengths(cache: object | None) -> list[int]:
    """Tokens held by each layer (0 for a layer that has not run yet)."""
    if isinstance(cache, BlockKV):
        return [cache.length] * cache.shape.layers
    out = []
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        out.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else 0)
    return out


def cached_length(cache: object | None) -> int:
    """Tokens every layer holds: the consistent prefix of the history."""
    lengths = layer_lengths(cache)
    return min(lengths) if lengths else 0


def read_kv(cache: object, layer: int, tokens: int, config: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of one layer's keys and values for the first ``tokens`` positions, ``[kv_heads, tokens, head_dim]``
    (empty ones, shaped from the model's ``config``, when the context is empty: a layer may not exist yet)."""
    if tokens == 0:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        empty = torch.empty((kv_heads, 0, head_dim))
        return empty, empty.clone()
    if isinstance(cache, BlockKV):
        keys, values = cache.read(layer, tokens)
        return keys.clone(), values.clone()
    held = cache.layers[layer]
    return held.keys[0, :, :tokens].clone(), held.values[0, :, :tokens].clone()


def write_kv(
    cache: object, layer: int, positions: list[int], keys: torch.Tensor | None, values: torch.Tensor | None
) -> None:
    """Overwrite one layer's keys and/or values at ``positions`` (``[kv_heads, len(positions), head_dim]``), in
    place: every later read of the cache (this forward's later layers, the next steps) sees them."""
    if isinstance(cache, BlockKV):
        cache.write_at(layer, positions, keys, values)
        return
    held = cache.layers[layer]
    index = torch.tensor(positions, device=held.keys.device)
    for name, new in (("keys", keys), ("values", values)):
        if new is not None:
            getattr(held, name)[0, :, index] = new


def kv_shape(cache: object, layer: int) -> tuple[int, int, torch.dtype, torch.device]:
    """(kv heads, head dim, dtype, device) of one layer's K/V: what an edit of them must match."""
    if isinstance(cache, BlockKV):
        s = cache.shape
        return s.kv_heads, s.head_dim, s.dtype, s.device
    keys = cache.layers[layer].keys
    return keys.shape[1], keys.shape[-1], keys.dtype, keys.device


def trim(cache: object, length: int) -> None:
    """Crop every layer to ``length`` tokens (views; the storage is reused by the next step's growth)."""
    if isinstance(cache, BlockKV):
        cache.truncate(length)
        return
    for layer, held in zip(cache.layers, layer_lengths(cache)):
        if held > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def clone(cache: object) -> object:
    """An independent copy of the cache, tensors included (for ``fork``)."""
    with torch.inference_mode():
        return cache.clone() if isinstance(cache, BlockKV) else copy.deepcopy(cache)


def for_module_path(cache: object | None, config: object) -> object:
    """The cache as transformers' forward reads it: a ``DynamicCache`` (a copy when it was blocks)."""
    if isinstance(cache, BlockKV):
        with torch.inference_mode():
            return cache.to_cache(config)
    if cache is None:
        from transformers import DynamicCache

        return DynamicCache(config=config)
    return cache


def for_fast_path(cache: object | None, shape: KVShape) -> BlockKV:
    """The cache as the runner reads it: blocks (a copy of the consistent prefix when it was a transformers cache)."""
    if isinstance(cache, BlockKV):
        return cache
    with torch.inference_mode():
        return BlockKV.from_cache(shape, cache, cached_length(cache))


def chat_turn_ids(tokenizer: object, history: list[int], eos_ids: tuple[int, ...], prompt: str) -> list[int]:
    """The tokens that close the assistant's last reply and open a new user turn, as the chat template writes them.

    The template is rendered for a conversation with a placeholder reply, with and without the new turn; the
    difference is the new turn, and what follows the placeholder is the reply's closing. When the history
    already ends with an end-of-turn token (generation stopped there), that token's text is not repeated.
    """
    before = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    after = [*before, {"role": "user", "content": prompt}]
    old = tokenizer.apply_chat_template(before, tokenize=False)
    new = tokenizer.apply_chat_template(after, tokenize=False, add_generation_prompt=True)
    if not new.startswith(old) or _SENTINEL not in old:
        raise InvalidArgumentError(
            "this model's chat template does not extend a conversation turn by turn; continue with chat=False "
            "and write the turn's text yourself, or start fresh with the whole conversation"
        )
    closing = old[old.rindex(_SENTINEL) + len(_SENTINEL) :]
    if history and history[-1] in eos_ids:
        ended = tokenizer.decode([history[-1]], skip_special_tokens=False)
        closing = closing.removeprefix(ended)
    return list(tokenizer(closing + new[len(old) :], add_special_tokens=False)["input_ids"])
