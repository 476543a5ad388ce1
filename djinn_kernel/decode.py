"""The token loop: prefill, then one forward per new token, with the session's KV cache.

Kept separate and small so that a faster loop (static cache, CUDA graphs, batched decode) can replace it
without touching breakpoints: the only contract is that ``on_step(t)`` is called before forward number ``t``
(0 = prefill) and that every forward runs on the calling thread, where the run's hooks are bound.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InvalidArgumentError


@dataclass
class DecodeResult:
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stopped_by_eos: bool = False


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature == 0``; otherwise softmax sampling with an explicit seed, so runs repeat."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``logits`` is ``[batch, vocab]``; returns ``[batch]`` token ids."""
        if generator is None:
            return logits.argmax(dim=-1)
        scaled = logits.float() / self.temperature
        if self.top_k is not None:
            kth = torch.topk(scaled, self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class ForwardCall:
    """How this model's forward takes the KV cache and the logits limit, decided once when the model is served.

    transformers renamed ``past_key_values`` to ``cache`` (5.24 warns on the old name on every forward and
    announces its removal in 5.40; 5.17 knows only the old one). Reading the forward's signature, rather than
    comparing version strings, also covers custom models that follow either convention.
    """

    cache_arg: str
    logits_to_keep: bool

    @classmethod
    def of(cls, model: nn.Module) -> ForwardCall:
        params = inspect.signature(model.forward).parameters
        if "cache" in params:
            cache_arg = "cache"
        elif "past_key_values" in params:
            cache_arg = "past_key_values"
        else:
            raise InvalidArgumentError(
                f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`, so Djinn cannot keep "
                f"a KV cache for it; serve a transformers causal LM (e.g. AutoModelForCausalLM)"
            )
        return cls(cache_arg, "logits_to_keep" in params)

    def kwargs(self, cache: object) -> dict[str, object]:
        extra: dict[str, object] = {self.cache_arg: cache, "use_cache": True}
        if self.logits_to_keep:
            extra["logits_to_keep"] = 1
        return extra


def decode(
    model: nn.Module,
    call: ForwardCall,
    input_ids: torch.Tensor,
    cache: object,
    max_new_tokens: int,
    eos_ids: set[int],
    sampling: Sampling,
    on_step: Callable[[int], None],
    keep_logits: bool = False,
    on_token: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int | None = None,
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` for one sequence. ``input_ids`` is ``[1, prompt_len]``. ``generator`` is
    the run's sampling state (kept by the run, so a run that changes paths mid-way samples on from where it was).
    ``prefill_chunk``: a longer prompt is fed in forwards of that many tokens (the last takes the rest), each
    attending to the KV the earlier ones stored; ``on_step(0)`` is called before each (prefill.py)."""
    result = DecodeResult()
    extra = call.kwargs(cache)
    ids = input_ids
    for step in range(max_new_tokens):
        on_step(step)
        while step == 0 and prefill_chunk is not None and ids.shape[1] > prefill_chunk:
            model(input_ids=ids[:, :prefill_chunk], **extra)
            ids = ids[:, prefill_chunk:]
            on_step(0)
        out = model(input_ids=ids, **extra)
        logits = out.logits[:, -1, :]  # [1, vocab]
        if keep_logits:
            result.logits.append(logits[0].detach().to("cpu", copy=True))
        token = sampling.pick(logits, generator)  # [1]
        token_id = int(token[0])
        result.tokens.append(token_id)
        if on_token is not None:
            on_token(token_id)
        if token_id in eos_ids:
            result.stopped_by_eos = True
            break
        ids = token.view(1, 1)
    return result
