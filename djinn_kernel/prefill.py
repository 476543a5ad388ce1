"""A prompt's forward: the device memory its activations take, and the chunks a long prompt is fed in.

A decode step's activations are a few rows; a prefill's grow with the prompt (every layer holds the prompt's
hidden states, its MLP's intermediate rows and, where attention materialises its scores, ``heads x new x
context`` of them). On a shared daemon one long prompt must not be able to take every session's memory, so the
engine reserves a run's prefill activations with its KV before the run starts (``MemoryManager.admit``), and
feeds a prompt longer than ``chunk`` tokens in chunks of ``chunk``: its activations are then bounded by one
chunk's, whatever the prompt's length, and on the fast path other sessions' decode steps run between chunks.

Chunks are an engine detail, invisible in what a run produces up to rounding (each chunk attends to the KV the
earlier ones stored, as the decode steps after it do): a run whose prompt forward must be seen whole (a
breakpoint that may hit at token step 0, an edit at given positions or replacing the whole activation, a
recording) is fed whole, and its reservation is the whole prompt's. ``OutOfMemoryError`` then says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads DEFAULT_CHUNK without importing torch
    import torch
    from torch import nn

    from .sessions import SessionState

DEFAULT_CHUNK = 2048  # prompt tokens per forward: on the H200 a 7B chunk is ~50 ms of compute, one weight read


@dataclass(frozen=True)
class ActivationCost:
    """What one forward's activations take, from the model's shape: ``bytes(new, context)``."""

    hidden: int
    intermediate: int
    heads: int
    kv_width: int  # K and V features of one token in one layer
    vocab: int
    itemsize: int
    scores: bool  # attention materialises [heads, new, context] scores
    mask: bool  # the forward builds a [new, context] attention mask

    @classmethod
    def of(cls, model: nn.Module, device: torch.device, fast: bool) -> ActivationCost | None:
        """The cost on the fast path (``fast``: on CUDA its kernels read the KV blocks in place, no scores, no
        mask; on the CPU its reference attends with SDPA under a mask) or on the module path (Hugging Face's
        forward builds a mask; SDPA's fused kernels on CUDA leave out the scores). ``None`` when the config
        does not give the shape (a custom model): then only the KV is reserved."""
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        if not hidden or not heads:
            return None
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        vocab = getattr(config, "vocab_size", None) or 0
        itemsize = next(model.parameters()).element_size()
        cuda = device.type == "cuda"
        fused = cuda and (fast or getattr(config, "_attn_implementation", None) == "sdpa")
        return cls(hidden, intermediate, heads, 2 * kv_heads * head_dim, vocab, itemsize, not fused, not (cuda and fast))

    def bytes(self, new: int, context: int) -> int:
        """Peak bytes of a forward feeding ``new`` tokens after ``context - new`` kept ones: one layer's
        working set (layers run one after another), counted generously: the residual stream and its float32
        norm, q/k/v, attention and MLP outputs, the gated MLP's three intermediate rows, the scores (and their
        float32 softmax) and the mask where the path makes them, and the last row's float32 logits."""
        rows = new * (
            (6 * self.hidden + self.kv_width + 3 * self.intermediate) * self.itemsize + 2 * self.hidden * 4
        )
        scores = self.heads * new * context * (2 * self.itemsize + 4) if self.scores else 0
        mask = new * context * 4 if self.mask else 0
        return rows + scores + mask + 4 * self.vocab


def chunked(session: SessionState, recording: bool) -> bool:
    """Whether the run's prompt may be fed in chunks: nothing sees or edits the prompt's forward as a whole
    (no breakpoint that may hit at token step 0, no recording, and steering only by edits that act on every
    row alike: those with a ``positions`` field left at ``None``)."""
    if recording or session.breakpoints.may_hit(0):
        return False
    return all(getattr(steer.edit, "positions", ()) is None for steer in session.steering.values())


def pieces(tokens: int, chunk: int | None) -> list[int]:
    """The sizes of the forwards a prompt of ``tokens`` is fed in: one, or chunks of ``chunk`` and the rest."""
    if chunk is None or tokens <= chunk:
        return [tokens]
    return [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])
