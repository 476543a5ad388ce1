"""Resolve a model name to weights and a tokenizer, offline: built-ins, local folders, the local HF cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidArgumentError, ModelNotFoundError


@dataclass
class ModelSource:
    model: nn.Module
    tokenizer: object
    chat: bool
    eos_ids: tuple[int, ...]
    source: str


def _eos_ids(model: nn.Module, tokenizer: object) -> tuple[int, ...]:
    ids: set[int] = set()
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(holder, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _from_pretrained(where: str, dtype: torch.dtype | str) -> ModelSource:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype)
    chat = getattr(tokenizer, "chat_template", None) is not None
    return ModelSource(model.eval(), tokenizer, chat, _eos_ids(model, tokenizer), where)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: object) -> torch.dtype | str:
    """``"auto"`` (the checkpoint's own), a name from ``DTYPES`` or one of those torch dtypes; else a clear error."""
    if dtype == "auto" or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InvalidArgumentError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, not {dtype!r}")


def resolve(
    name: str, dtype: torch.dtype | str = "auto", progress: Callable[[str], None] | None = None
) -> ModelSource:
    """Load ``name``: a built-in (``tiny-llama``, ``tiny-gpt2``, ``smollm2-135m``), a folder, or a cached hub id.

    Nothing is downloaded: a model that is not on this machine raises ``ModelNotFoundError`` saying how to
    get it.
    """
    from . import builtin  # transformers' model classes: imported when a model is first resolved

    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"a model name must be a non-empty string, not {name!r}")
    dtype = parse_dtype(dtype)
    if name in builtin.BUILTIN_NAMES:
        try:
            model, tokenizer, info = builtin.build_builtin(name, progress=progress)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc)) from None
        eos = tuple(info.get("eos_token_ids") or _eos_ids(model, tokenizer))
        model = model if dtype == "auto" else model.to(dtype)
        return ModelSource(model.eval(), tokenizer, bool(info["chat"]), eos, str(info["source"]))
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        try:
            return _from_pretrained(str(path), dtype)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"{path} is not a loadable Hugging Face causal-LM folder: {exc}") from None
    try:
        return _from_pretrained(name, dtype)
    except (OSError, ValueError):
        raise ModelNotFoundError(
            f"no model {name!r} here: it is not a built-in ({', '.join(builtin.BUILTIN_NAMES)}), not a folder, "
            f"and not in the local Hugging Face cache. Djinn never downloads at run time: fetch it on a machine "
            f"with network access (`huggingface-cli download {name}`) or pass the folder that holds it."
        ) from None
