"""The KV cache at a pause: ``pause.kv(layer)`` reads the context the paused step attends to, ``pause.edit_kv``
writes it in place. Both are checked against Hugging Face's own cache, read and edited by hand."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import hf_forwards, plain_run
from djinn_kernel.decode import ForwardCall
from djinn_kernel.errors import InvalidArgumentError, InvalidTargetError, InvalidTensorError, NotPausedError

PROMPT = list(range(5, 17))
NEW = 8
KINDS = ["inprocess", "daemon", "inprocess-fast"]


def hf_cache(net, fed: list[int]):
    """Hugging Face's cache after its prefill of ``PROMPT`` and a decode step for each token of ``fed``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=net.config)
    for _ in hf_forwards(net, PROMPT, fed, cache):
        pass
    return cache


@pytest.fixture(scope="module")
def reference(backends):
    return plain_run(backends, PROMPT, NEW)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_at_a_pause_is_the_context_before_the_step(kind, backends, reference):
    net, tokens, _ = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    last = model.num_layers - 1
    with model.session() as s:
        for step in (0, 1, 5):
            s.break_at(1, tokens=step)
        run = s.generate(PROMPT, NEW)
        seen = []
        while run.paused:
            step = run.pause.token_step
            context = PROMPT + tokens[: step - 1] if step else []
            for layer in (0, 1, last):
                keys, values = run.pause.kv(layer)
                assert keys.shape[1] == values.shape[1] == len(context)
                if context:
                    cache = hf_cache(net, tokens[: step - 1])
                    assert torch.equal(keys, cache.layers[layer].keys[0])
                    assert torch.equal(values, cache.layers[layer].values[0])
            seen.append(step)
            run.resume()
        assert seen == [0, 1, 5] and run.tokens == tokens


@pytest.mark.parametrize("kind", KINDS)
def test_a_knocked_out_token_acts_at_once_and_stays(kind, backends, reference):
    """Zero the last layer's values of prompt token 3 at the pause of step 2 (layer 1, so the last layer has not
    run yet in that step): from that step on, the run continues exactly as Hugging Face does with its cache
    edited the same way before the step."""
    net, tokens, logits = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    last = model.num_layers - 1
    with model.session() as s:
        s.break_at(1, tokens=2)
        run = s.generate(PROMPT, NEW, keep_logits=True)
        keys, values = run.pause.kv(last)
        before = [run.pause.kv(layer)[1] for layer in range(model.num_layers)]
        run.pause.edit_kv(last, [3], values=torch.zeros(values.shape[0], 1, values.shape[2]))
        after_keys, after_values = run.pause.kv(last)
        assert torch.equal(after_values[:, 3], torch.zeros_like(values[:, 3]))
        others = [p for p in range(values.shape[1]) if p != 3]
        assert torch.equal(after_values[:, others], values[:, others]), "only the edited position changed"
        assert torch.equal(after_keys, keys), "keys were not asked for: unchanged"
        assert all(torch.equal(run.pause.kv(layer)[1], held) for layer, held in enumerate(before) if layer != last)
        run.finish()
        got_tokens, got_logits = run.tokens, run.logits
        assert s.history == len(PROMPT) + NEW

    cache = hf_cache(net, tokens[:1])
    expected, fed = [], tokens[1]
    with torch.inference_mode():
        cache.layers[last].values[0, :, 3] = 0
        for _ in range(NEW - 2):
            out = net(torch.tensor([[fed]]), **ForwardCall.of(net).kwargs(cache))
            expected.append(out.logits[0, -1])
            fed = int(out.logits[0, -1].argmax())
    assert got_tokens[:2] == tokens[:2] and torch.equal(got_logits[:2], logits[:2])
    assert torch.equal(got_logits[2:], torch.stack(expected)), "the edit is read from step 2 on, bit for bit"
    assert not torch.equal(got_logits[2:], logits[2:])


@pytest.mark.parametrize("kind", ["inprocess", "daemon"])
def test_bad_kv_requests_are_refused_alike_and_change_nothing(kind, backends, reference):
    _, tokens, logits = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        s.break_at(1, tokens=2)
        run = s.generate(PROMPT, NEW, keep_logits=True)
        pause = run.pause
        keys, values = pause.kv(0)
        heads, held, dim = values.shape
        zeros = torch.zeros(heads, 1, dim)
        cases = [
            (InvalidTargetError, lambda: pause.kv(model.num_layers)),
            (InvalidTargetError, lambda: pause.edit_kv("0", [1], values=zeros)),
            (InvalidArgumentError, lambda: pause.edit_kv(0, [held], values=zeros)),
            (InvalidArgumentError, lambda: pause.edit_kv(0, [], values=zeros)),
            (InvalidArgumentError, lambda: pause.edit_kv(0, "1", values=zeros)),
            (InvalidArgumentError, lambda: pause.edit_kv(0, [1])),
            (InvalidTensorError, lambda: pause.edit_kv(0, [1, 2], values=zeros)),
            (InvalidTensorError, lambda: pause.edit_kv(0, [1], keys=zeros, values=torch.full_like(zeros, float("nan")))),
            (InvalidTensorError, lambda: pause.edit_kv(0, [1], values=zeros.long())),
        ]
        for error, call in cases:
            with pytest.raises(error):
                call()
        assert torch.equal(pause.kv(0)[0], keys) and torch.equal(pause.kv(0)[1], values)
        run.finish()
        assert run.tokens == tokens and torch.equal(run.logits, logits)
        with pytest.raises(NotPausedError):
            pause.kv(0)
