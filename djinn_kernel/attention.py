"""Attention weights at a pause, computed on demand: fused attention kernels never materialise them.

At a pause on a decoder layer's input (or the previous layer's output) the paused activation is exactly what
that layer's attention will read, so its queries and its new keys follow from it, and the keys of the context
are in the session's cache. The weights are Hugging Face's eager attention (``q k^T * scale``, causal, softmax
in float32), for the rows of this step's tokens over the context and themselves. An edit made at the pause is
included: the weights are those the layer will compute from the edited value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidTargetError


def attention_weights(
    layer: nn.Module, rotary: nn.Module, h: torch.Tensor, past_keys: torch.Tensor, start: int
) -> torch.Tensor:
    """``[heads, tokens, start + tokens]`` weights of a Llama-family decoder ``layer`` whose input is ``h``
    (``[1, tokens, hidden]``, at positions ``start ...``) over ``past_keys`` (``[kv_heads, start, head_dim]``)
    and its own new keys."""
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "head_dim", "scaling")
    if attn is None or any(not hasattr(attn, name) for name in needed) or not hasattr(layer, "input_layernorm"):
        raise InvalidTargetError(
            f"attention weights at a pause are computed for Llama-family decoder layers (self_attn.q_proj/k_proj); "
            f"{type(layer).__name__} is not one"
        )
    if hasattr(attn, "q_norm"):
        raise InvalidTargetError("attention weights with query/key norms are not computed yet")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    tokens, d = h.shape[1], attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, tokens, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, tokens, -1, d).transpose(1, 2)
    positions = torch.arange(start, start + tokens, device=h.device)[None]
    cos, sin = rotary(h, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = torch.cat([past_keys[None].to(k.dtype), k], dim=2)
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling
    seen = torch.arange(start + tokens, device=h.device)[None, :] <= positions[0][:, None]
    scores = scores.masked_fill(~seen, float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)[0]
