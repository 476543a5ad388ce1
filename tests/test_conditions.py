"""Conditional breakpoints: each predicate pauses exactly on the token steps a direct computation picks.

The direct computation is Hugging Face's own forward over the prompt and the generated tokens
(``output_hidden_states``): a decoder layer's output at token step 0 is its prompt positions, at step t the
position of the token fed at that step.
"""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import drain, plain_run
from djinn_kernel.conditions import parse
from djinn_kernel.sae import SAE

PROMPT = list(range(5, 17))
LAYER = 2
NEW = 12
KINDS = ["inprocess", "daemon", "inprocess-fast"]


@pytest.fixture(scope="module")
def reference(backends):
    """Tokens of an unarmed run and, per token step, the layer's output rows and the logit lens's top token."""
    net, tokens, _ = plain_run(backends, PROMPT, NEW)
    with torch.inference_mode():
        ids = torch.tensor([PROMPT + tokens[:-1]])
        hidden = net(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]  # [positions, hidden]
        steps = [hidden[: len(PROMPT)]] + [hidden[len(PROMPT) + t - 1 : len(PROMPT) + t] for t in range(1, NEW)]
        lens = [int(net.lm_head(net.model.norm(rows[-1:]))[0].argmax()) for rows in steps]
    return tokens, steps, lens


def threshold(values: list[float]) -> float:
    """A cut between two of ``values`` (from the middle half) with the widest gap, so that float rounding
    cannot move a step across it and both sides keep some steps."""
    ordered = sorted(values)
    n = len(ordered)
    return max((ordered[i + 1] - ordered[i], (ordered[i] + ordered[i + 1]) / 2) for i in range(n // 4, 3 * n // 4))[1]


def pauses(model: dj.Model, when: str) -> tuple[list[int], list[int], list[str]]:
    with model.session() as s:
        s.break_at(LAYER, when=when)
        run = s.generate(PROMPT, NEW)
        steps, reasons = [], []
        while run.paused:
            steps.append(run.pause.token_step)
            reasons.append(run.pause.info["reason"])
            run.resume()
        return steps, run.tokens, reasons


@pytest.mark.parametrize("kind", KINDS)
def test_norm_and_dim_conditions_pause_where_the_activation_says(kind, backends, reference):
    tokens, steps, _ = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    norms = [float(rows.norm(dim=-1).max()) for rows in steps]
    cut = threshold(norms)
    got, got_tokens, reasons = pauses(model, f"norm > {cut}")
    assert got == [t for t, n in enumerate(norms) if n > cut] and 0 < len(got) < NEW
    assert got_tokens == tokens, "a condition that only reads changes nothing"
    assert all(r.startswith(f"condition: norm > {cut} (norm ") for r in reasons)
    dims = [float(rows[:, 7].min()) for rows in steps]
    low = threshold(dims)
    got, _, _ = pauses(model, f"dim[7] < {low}")
    assert got == [t for t, d in enumerate(dims) if d < low] and got


@pytest.mark.parametrize("kind", KINDS)
def test_lens_and_token_conditions(kind, backends, reference):
    tokens, _, lens = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    target = max(set(lens), key=lens.count) if len(set(lens)) > 1 else lens[0]
    got, _, reasons = pauses(model, f"lens_top1 == #{target}")
    assert got == [t for t, top in enumerate(lens) if top == target] and got
    assert f"top token is #{target}" in reasons[0]
    fed = tokens[3]
    got, _, _ = pauses(model, f"token == #{fed}")
    assert got == [t for t in range(1, NEW) if tokens[t - 1] == fed] and 4 in got


@pytest.mark.parametrize("kind", KINDS)
def test_lens_becomes_pauses_where_the_prediction_changes_to_the_token(kind, backends, reference):
    tokens, _, lens = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    expected = {top: [t for t, now in enumerate(lens) if now == top and (t == 0 or lens[t - 1] != top)]
                for top in set(lens)}
    target = max(expected, key=lambda top: (len(expected[top]) < lens.count(top), len(expected[top])))
    got, got_tokens, reasons = pauses(model, f"lens_top1 becomes #{target}")
    assert got == expected[target] and got and got_tokens == tokens
    assert all(f"top token is #{target}" in r for r in reasons)
    assert all(("first step" in r) == (t == 0) and ("the step before" in r) == (t > 0) for t, r in zip(got, reasons))


def random_sae(hidden: int, features: int = 16) -> SAE:
    gen = torch.Generator().manual_seed(3)
    w_enc = torch.randn(hidden, features, generator=gen)
    weights = {"W_enc": w_enc, "b_enc": torch.zeros(features), "W_dec": w_enc.T.contiguous(), "b_dec": torch.zeros(hidden)}
    return SAE.checked(weights, apply_b_dec_to_input=True)


@pytest.mark.parametrize("kind", KINDS)
def test_feature_condition_pauses_where_the_attached_sae_says(kind, backends, reference):
    tokens, steps, _ = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    sae = random_sae(steps[0].shape[-1])
    acts = [float(sae.encode(rows)[:, 5].max()) for rows in steps]
    cut = threshold(acts)
    with model.session() as s:
        with pytest.raises(dj.InvalidArgumentError, match="attach one there first"):
            s.break_at(LAYER, when=f"feature[5] > {cut}")
        s.attach_sae(LAYER, sae)
        with pytest.raises(dj.InvalidArgumentError, match="outside the 16 features"):
            s.break_at(LAYER, when="feature[16] > 0")
        s.break_at(LAYER, when=f"feature[5] > {cut}")
        run = s.generate(PROMPT, NEW)
        got = [p[3] for p in drain(run)]
    assert got == [t for t, a in enumerate(acts) if a > cut] and 0 < len(got) < NEW
    assert run.tokens == tokens, "a condition that only reads changes nothing"


def test_conditions_combine_with_token_limits(backends, reference):
    tokens, steps, _ = reference
    model = dj.load("tiny-llama", backend=backends("inprocess"))
    with model.session() as s:
        s.break_at(LAYER, when="norm > 0", tokens=(3, 5), max_hits=2)
        run = s.generate(PROMPT, NEW)
        assert [p[3] for p in drain(run)] == [3, 4] and run.tokens == tokens
        assert s.breakpoints[0]["when"] == "norm > 0"


@pytest.mark.parametrize(
    "text, message",
    [
        ("norm >> 3", "cannot read"),
        ("dim[99] > 1", "outside the 64 hidden"),
        ("token == #100000", "outside the vocabulary"),
        ("lens_top1 == 'Paris and more'", "a condition names one token"),
        ("token becomes #3", "'becomes' is for lens_top1"),
        ("feature[x] > 1", "cannot read"),
        (42, "as text"),
    ],
)
def test_bad_conditions_are_refused_when_set(backends, text, message):
    model = dj.load("tiny-llama", backend=backends("inprocess"))
    with model.session() as s:
        with pytest.raises(dj.InvalidArgumentError, match=message):
            s.break_at(LAYER, when=text)
        assert s.breakpoints == []


def test_the_parser_reads_every_form():
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    assert parse(" norm < 3.5 ", None, 10, 8).op == "<"
    assert parse("dim[ 3 ] > -1e-2", None, 10, 8).threshold == -0.01
    assert parse("lens_top1 == 'x'", encode, 200, 8).index == ord("x")
    assert parse('token == "y"', encode, 200, 8).index == ord("y")
    becomes = parse("lens_top1 becomes #7", None, 10, 8)
    assert (becomes.kind, becomes.op, becomes.index) == ("lens_top1", "becomes", 7)
    feature = parse("feature[12] < -0.5", None, 10, 8)
    assert (feature.kind, feature.op, feature.threshold, feature.index) == ("feature", "<", -0.5, 12)
    with pytest.raises(dj.InvalidArgumentError, match="no tokenizer"):
        parse("token == 'x'", None, 200, 8)
