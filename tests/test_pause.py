"""Breakpoints really pause the forward; unmodified pauses are bitwise invisible; edits and steering change it."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE, PROMPT, drain, reference, torch_model


@pytest.mark.inprocess
@pytest.mark.module_path
def test_pause_blocks_later_layers(engine, session, model):
    net = torch_model(engine, model)
    layers = engine._model(model.info["id"]).anatomy.layer_paths
    entered = [0] * len(layers)
    handles = [
        net.get_submodule(p).register_forward_pre_hook(lambda *_, i=i: entered.__setitem__(i, entered[i] + 1))
        for i, p in enumerate(layers)
    ]
    try:
        session.break_at(1, once=True)
        run = session.generate(PROMPT, 4)
        assert run.paused and run.pause.layer == 1 and run.pause.token_step == 0
        assert entered == [1, 1, 0, 0], "layers after the breakpoint must not run while paused"
        run.finish()
        assert run.state == "finished"
        assert entered == [len(run.tokens)] * len(layers)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("side", ["output", "input"])
def test_unmodified_pauses_are_bitwise_identical_at_every_layer(session, model, side):
    tokens, logits = reference(model)
    for layer in range(model.num_layers):
        session.delete()
        session.break_at(layer, side=side)
        run = session.generate(PROMPT, 8, keep_logits=True)
        stops = drain(run)
        assert [s[3] for s in stops] == list(range(len(tokens))), "one pause per token step, prefill included"
        assert {s[0] for s in stops} == {layer} and {s[2] for s in stops} == {side}
        assert run.tokens == tokens
        assert torch.equal(run.logits, logits)


def test_module_path_breakpoint_is_exact(session, model):
    tokens, logits = reference(model)
    attn = "model.layers.2.self_attn" if model.name == "tiny-llama" else "transformer.h.2.attn"
    session.break_at(attn)
    run = session.generate(PROMPT, 8, keep_logits=True)
    stops = drain(run)
    assert len(stops) == len(tokens) and stops[0][1] == attn and stops[0][0] is None
    assert torch.equal(run.logits, logits) and run.tokens == tokens


@pytest.mark.inprocess
def test_activation_matches_hidden_states(engine, session, model):
    net = torch_model(engine, model)
    ids = torch.tensor([engine._model(model.info["id"]).encode(PROMPT, chat=False)], device=DEVICE)
    with torch.no_grad():
        hidden = net(ids, output_hidden_states=True).hidden_states
    for layer in range(model.num_layers - 1):  # the last entry of hidden_states has the final norm applied
        session.delete()
        session.break_at(layer, tokens=0)
        run = session.generate(PROMPT, 2)
        assert torch.equal(run.pause.activation, hidden[layer + 1].cpu())
        assert run.pause.shape == tuple(hidden[layer + 1].shape)
        run.finish()


@pytest.mark.inprocess
def test_tokens_match_hugging_face_generate(engine, model):
    tokens, _ = reference(model, max_new_tokens=10)
    net = torch_model(engine, model)
    ids = torch.tensor([engine._model(model.info["id"]).encode(PROMPT, chat=False)], device=DEVICE)
    out = net.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out[0, ids.shape[1] :].tolist()[: len(tokens)] == tokens


def test_hit_limits(session):
    session.break_at(2, once=True)
    assert [s[3] for s in drain(session.generate(PROMPT, 5))] == [0]
    session.delete()
    session.break_at(2, tokens=(1, 3))
    assert [s[3] for s in drain(session.generate(PROMPT, 5))] == [1, 2, 3]
    session.delete()
    session.break_at(2, tokens="4")
    assert [s[3] for s in drain(session.generate(PROMPT, 5))] == [4]
    session.delete()
    bp = session.break_at(2, max_hits=3)
    assert [s[3] for s in drain(session.generate(PROMPT, 5))] == [0, 1, 2]
    assert session.breakpoints[0]["hits"] == 3 and session.breakpoints[0]["id"] == bp


def test_step_walks_layers_then_tokens(session, model):
    tokens, logits = reference(model, max_new_tokens=3)
    session.break_at(0, once=True)
    run = session.generate(PROMPT, 3, keep_logits=True)
    seen = []
    while run.paused:
        seen.append((run.pause.token_step, run.pause.layer))
        run.step()
    n = model.num_layers
    assert seen == [(t, i) for t in range(3) for i in range(n)]
    assert run.tokens == tokens and torch.equal(run.logits, logits)


def test_finish_ignores_breakpoints(session, model):
    tokens, logits = reference(model)
    session.break_at(0)
    session.break_at(3)
    run = session.generate(PROMPT, 8, keep_logits=True)
    assert run.paused and run.pause.layer == 0
    run.finish()
    assert run.state == "finished" and run.tokens == tokens and torch.equal(run.logits, logits)


def test_two_breakpoints_same_step_order(session):
    session.break_at(3)
    session.break_at(1)
    stops = drain(session.generate(PROMPT, 2))
    assert [(s[3], s[0]) for s in stops] == [(0, 1), (0, 3), (1, 1), (1, 3)]


def test_edit_changes_output_and_reset_restores(session, model):
    tokens, logits = reference(model)
    session.break_at(1, tokens=0)
    run = session.generate(PROMPT, 8, keep_logits=True)
    original = run.pause.activation
    run.pause.scale(-3.0)
    assert torch.equal(run.pause.activation, original * -3.0)
    assert torch.equal(run.pause.original, original)
    run.resume()
    assert not torch.equal(run.logits, logits)

    run = session.generate(PROMPT, 8, keep_logits=True)
    run.pause.scale(-3.0).reset()
    run.resume()
    assert torch.equal(run.logits, logits) and run.tokens == tokens


def test_replace_with_identical_copy_is_exact(session, model):
    tokens, logits = reference(model)
    session.break_at(2)
    run = session.generate(PROMPT, 8, keep_logits=True)
    while run.paused:
        run.pause.replace(run.pause.activation.clone())
        run.resume()
    assert torch.equal(run.logits, logits) and run.tokens == tokens


def test_persistent_steering(session, model):
    tokens, logits = reference(model)
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(1))
    sid = session.steer(2, vector, alpha=0.0)
    run = session.generate(PROMPT, 8, keep_logits=True)
    assert run.state == "finished" and torch.equal(run.logits, logits), "adding 0 * v is the identity"
    session.unsteer(sid)
    session.steer(2, vector, alpha=8.0)
    steered = session.generate(PROMPT, 8, keep_logits=True)
    assert steered.state == "finished" and not torch.equal(steered.logits, logits)
    assert session.steering[0]["layer"] == 2
    session.unsteer()
    plain = session.generate(PROMPT, 8, keep_logits=True)
    assert torch.equal(plain.logits, logits)


def test_vectors_and_replacements_in_other_float_dtypes_are_cast(session, model):
    tokens, _ = reference(model)
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(1))
    session.steer(2, vector, alpha=4.0)
    native = session.generate(PROMPT, 8).tokens
    session.unsteer()
    session.steer(2, vector.double(), alpha=4.0)
    assert session.generate(PROMPT, 8).tokens == native, "a float64 vector steers as its float32 cast does"
    session.unsteer()
    session.break_at(1, tokens=0)
    run = session.generate(PROMPT, 8)
    run.pause.replace(run.pause.activation.double())
    run.finish()
    assert run.tokens == tokens, "a float64 copy of the activation is cast back: nothing changes"


def test_pause_shows_steered_activation(session, model):
    vector = torch.ones(model.hidden_size)
    session.break_at(1, tokens=0)
    run = session.generate(PROMPT, 2)
    plain = run.pause.activation
    run.finish()
    session.steer(1, vector, alpha=2.0)
    run = session.generate(PROMPT, 2)
    assert torch.equal(run.pause.activation, plain + 2.0 * vector)
    run.finish()


def test_logit_lens_at_last_layer_equals_model_logits(session, model):
    _, logits = reference(model, max_new_tokens=1)
    session.break_at(model.num_layers - 1, tokens=0)
    run = session.generate(PROMPT, 1)
    lens = run.pause.logit_lens(k=5)
    top = torch.topk(logits[0], 5)
    assert [row["token_id"] for row in lens] == top.indices.tolist()
    assert [row["logit"] for row in lens] == top.values.tolist()
    assert abs(sum(r["prob"] for r in run.pause.logit_lens(k=logits.shape[-1])) - 1.0) < 1e-4
    run.finish()


def test_several_sessions_paused_at_once(model):
    tokens, logits = reference(model)
    a, b, c = model.session(), model.session(), model.session()
    try:
        a.break_at(1)
        b.break_at(3)
        ra = a.generate(PROMPT, 8, keep_logits=True)
        rb = b.generate(PROMPT, 8, keep_logits=True)
        rc = c.generate(PROMPT, 8, keep_logits=True)  # no breakpoint: runs to the end while a and b wait
        assert ra.paused and rb.paused and rc.state == "finished"
        assert ra.pause.layer == 1 and rb.pause.layer == 3
        while ra.paused or rb.paused:
            for r in (ra, rb):
                if r.paused:
                    r.resume()
        for r in (ra, rb, rc):
            assert r.tokens == tokens and torch.equal(r.logits, logits)
    finally:
        for s in (a, b, c):
            s.close()


def test_cancel_and_close_while_paused(model):
    tokens, _ = reference(model)
    s = model.session()
    s.break_at(0)
    run = s.generate(PROMPT, 8)
    run.cancel()
    assert run.state == "cancelled" and s.status()["state"] == "idle"
    s.delete()
    assert s.generate(PROMPT, 8).tokens == tokens
    s.break_at(0)
    s.generate(PROMPT, 8)
    s.close()
    with pytest.raises(dj.SessionClosedError):
        s.generate(PROMPT, 2)


def test_stale_pause_refuses_edits(session):
    session.break_at(0)
    run = session.generate(PROMPT, 3)
    first = run.pause
    run.resume()
    with pytest.raises(dj.NotPausedError, match="moved on"):
        first.scale(2.0)
    run.finish()


@pytest.mark.inprocess
def test_interrupted_wait_leaves_a_usable_run(session, model, monkeypatch):
    """Ctrl-C while the engine's generate waits: the run goes on; the next call on the session picks its state up.

    (The engine's own contract; the API handles turn the same interrupt into a cancel: tests/test_streaming.py.)"""
    from djinn_kernel.handoff import Handoff

    tokens, _ = reference(model)
    real_wait = Handoff.wait
    calls = []

    def interrupted(self, after, timeout=None):
        if not calls:
            calls.append(after)
            raise KeyboardInterrupt
        return real_wait(self, after, timeout)

    session.break_at(2, once=True)
    monkeypatch.setattr(Handoff, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        session._backend.generate(session.id, PROMPT, 8)
    monkeypatch.setattr(Handoff, "wait", real_wait)
    with pytest.raises(dj.SessionBusyError, match="(paused|running) run"):
        session._backend.generate(session.id, PROMPT, 8)
    snapshot = session._backend.wait(session.id)
    assert snapshot["state"] == "paused" and snapshot["pause"]["layer"] == 2
    assert session._backend.resume(session.id, "continue")["tokens"] == tokens


def test_logit_lens_preview_of_an_edit_leaves_the_pause_alone(session, model):
    session.break_at(model.num_layers - 1, tokens=0)
    run = session.generate(PROMPT, 2)
    pause = run.pause
    preview = pause.logit_lens(k=5, edit=dj.Scale(-4.0))
    assert pause.info["edits"] == 0 and preview != pause.logit_lens(k=5)
    pause.scale(-4.0)
    assert pause.logit_lens(k=5) == preview, "the preview is exactly what applying the edit gives"
    run.finish()
