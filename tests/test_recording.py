"""Recording: module outputs kept at every step of a run, without pausing, equal to what Hugging Face computes,
bounded by the host pool, the same through the daemon and on a fast-path engine."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE, hf_forwards, make_engine, plain_run
from djinn_kernel.engine import Engine
from djinn_kernel.errors import InvalidArgumentError, OutOfMemoryError
from djinn_kernel.memory import MemoryManager

PROMPT = list(range(5, 17))
NEW = 6
KINDS = ["inprocess", "daemon", "inprocess-fast"]


@pytest.fixture(scope="module")
def reference(backends):
    """Tokens and logits of an unrecorded run, and the outputs of layer 1 and of layer 2's MLP at each of its
    forwards (the prefill, then one token at a time), from Hugging Face's own modules."""
    net, tokens, logits = plain_run(backends, PROMPT, NEW)
    seen: list[torch.Tensor] = []
    handle = net.model.layers[2].mlp.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        layer1 = [out.hidden_states[2][0] for out in hf_forwards(net, PROMPT, tokens[:-1], output_hidden_states=True)]
    finally:
        handle.remove()
    return tokens, logits, torch.cat(layer1), torch.cat(seen)


@pytest.mark.parametrize("kind", KINDS)
def test_recorded_rows_are_the_modules_outputs_and_change_nothing(kind, backends, reference):
    tokens, logits, layer1, mlp = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        ids = s.record([1, "model.layers.2.mlp"])
        run = s.generate(PROMPT, NEW, keep_logits=True)
        assert run.tokens == tokens and torch.equal(run.logits, logits), "recording changes nothing"
        got = run.recorded
        assert got[1].shape == (len(PROMPT) + NEW - 1, model.hidden_size)
        assert torch.equal(got[1], layer1) and torch.equal(got["model.layers.1"], layer1)
        assert torch.equal(got["model.layers.2.mlp"], mlp)
        s.unrecord(ids[1])
        again = s.generate(PROMPT, NEW).recorded
        assert list(again) == ["model.layers.1", 1] and torch.equal(again[1], layer1), "kept for every later run"


@pytest.mark.parametrize("kind", ["inprocess", "daemon", "daemon-fast"])
def test_chosen_prompt_positions_and_bad_requests(kind, backends, reference):
    _, _, layer1, _ = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        s.record(1, positions=[0, -1])
        rows = s.generate(PROMPT, NEW).recorded[1]
        assert torch.equal(rows, torch.cat([layer1[[0, len(PROMPT) - 1]], layer1[len(PROMPT):]]))
        with pytest.raises(InvalidArgumentError, match="already recorded"):
            s.record(1)
        with pytest.raises(InvalidArgumentError, match="positions"):
            s.record(2, positions="last")
        with pytest.raises(dj.InvalidTargetError):
            s.record(99)
        s.unrecord()
        with pytest.raises(InvalidArgumentError, match="recorded nothing"):
            s.generate(PROMPT, 2).recorded  # noqa: B018


@pytest.mark.parametrize("fast", [False, True])
def test_a_recording_the_host_pool_cannot_hold_fails_the_run_clearly_and_nothing_else(fast):
    memory = MemoryManager(torch.device(DEVICE), 1 << 40, 4096, chunk_bytes=4096)
    engine = Engine(device=DEVICE, memory=memory, fast=True) if fast else make_engine(memory=memory)
    model = dj.load("tiny-llama", backend=engine)
    with model.session() as s:
        expected = s.generate(PROMPT, NEW).tokens
        s.record(1)
        with pytest.raises(OutOfMemoryError, match="recording model.layers.1 needs"):
            s.generate(PROMPT, 200)
        s.unrecord()
        assert s.generate(PROMPT, NEW).tokens == expected
    assert memory.pool.used == 0, "the failed run's rows went back to the pool"
    engine.shutdown()
