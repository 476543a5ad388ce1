"""Bad input gets the same clear error in-process and through the daemon, and changes nothing (issue 13).

Each case is one call on a fresh session of tiny-llama; the expected class is checked in both modes, then the
session must still produce the reference tokens.
"""

from __future__ import annotations

import pytest

import djinn_kernel as dj

KINDS = ["inprocess", "daemon"]
PROMPT = list(range(5, 17))

CASES = {
    "seed of the wrong type": lambda m, s: s.generate(PROMPT, 2, seed="7"),
    "chat not a bool": lambda m, s: s.generate(PROMPT, 2, chat="yes"),
    "keep_logits not a bool": lambda m, s: s.generate(PROMPT, 2, keep_logits="no"),
    "a lone surrogate in the prompt": lambda m, s: s.generate("caf\ud800", 2),
    "chat=True without a chat template": lambda m, s: s.generate("hello", 2, chat=True),
    "a superscript digit in tokens": lambda m, s: s.break_at(1, tokens="²"),
    "a stepped token range": lambda m, s: s.break_at(1, tokens=range(0, 4, 2)),
    "a bool in a token pair": lambda m, s: s.break_at(1, tokens=(True, 3)),
    "a negative token id": lambda m, s: m.token_strings([-1]),
    "a huge token id": lambda m, s: m.token_strings([10**12]),
    "a NaN timeout": lambda m, s: s.generate(PROMPT, 2).wait(timeout=float("nan")),
    "a text timeout": lambda m, s: s.generate(PROMPT, 2).wait(timeout="abc"),
    "a garbage dtype": lambda m, s: dj.load("tiny-llama", dtype="float13", backend=m._backend),
}


@pytest.fixture(scope="module")
def reference(backends):
    with dj.load("tiny-llama", backend=backends("inprocess")).session() as s:
        return s.generate(PROMPT, 6).tokens


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_refused_alike_and_changes_nothing(kind, case, backends, reference):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        with pytest.raises(dj.InvalidArgumentError):
            CASES[case](model, s)
        assert s.breakpoints == []
        assert s.generate(PROMPT, 6).tokens == reference


def replaced_tokens(backend, expanded: bool) -> list[int]:
    with dj.load("tiny-llama", backend=backend).session() as s:
        s.break_at(1, tokens=0)  # the prefill: [1, tokens, hidden], so the expanded row has stride 0 over tokens
        run = s.generate(PROMPT, 6)
        row = run.pause.activation[..., -1:, :]
        run.pause.replace(row.expand(run.pause.shape) if expanded else row.expand(run.pause.shape).contiguous())
        return run.finish().tokens


def test_an_expanded_replacement_acts_alike_in_both_modes(backends):
    tokens = {kind: replaced_tokens(backends(kind), True) for kind in KINDS}
    assert tokens["inprocess"] == tokens["daemon"] == replaced_tokens(backends("inprocess"), False)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dtype_asked_for_is_the_dtype_served(kind, backends):
    model = dj.load("tiny-gpt2", dtype="bfloat16", backend=backends(kind))
    assert model.info["dtype"] == "bfloat16"
    with model.session() as s:
        assert len(s.generate(PROMPT, 3).tokens) == 3
