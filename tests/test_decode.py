"""The token loop's contract with transformers: how the KV cache is passed, decided from the forward's signature."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from djinn_kernel.builtin import build_builtin
from djinn_kernel.decode import ForwardCall, Sampling, decode
from djinn_kernel.errors import InvalidArgumentError


class OldStyle(nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        raise NotImplementedError


class NewStyle(nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None, logits_to_keep=0):
        raise NotImplementedError


class NoCache(nn.Module):
    def forward(self, input_ids):
        raise NotImplementedError


def test_the_cache_argument_follows_the_signature() -> None:
    assert ForwardCall.of(OldStyle()) == ForwardCall("past_key_values", logits_to_keep=False)
    assert ForwardCall.of(NewStyle()) == ForwardCall("cache", logits_to_keep=True)
    assert ForwardCall.of(NewStyle()).kwargs("kv") == {"cache": "kv", "use_cache": True, "logits_to_keep": 1}


def test_a_model_without_a_cache_argument_is_refused_with_advice() -> None:
    with pytest.raises(InvalidArgumentError, match="AutoModelForCausalLM"):
        ForwardCall.of(NoCache())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_installed_transformers_takes_the_cache_without_a_warning(name: str) -> None:
    """Whatever transformers is installed (CI tests both ends of the supported range), no deprecation is hit."""
    from transformers import DynamicCache

    model, tokenizer, _ = build_builtin(name)
    call = ForwardCall.of(model)
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            result = decode(model, call, ids, cache, 4, set(), Sampling(), on_step=lambda step: None)
    assert len(result.tokens) == 4
    assert cache.get_seq_length() == ids.shape[-1] + 3  # the cache really was used: prompt + 3 decode inputs


def test_importing_djinn_imports_neither_torch_nor_transformers() -> None:
    """`%load_ext djinn_kernel` can then say that torch is loading before the seconds it takes."""
    import subprocess
    import sys

    code = "import sys, djinn_kernel as dj; dj.DjinnError; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
