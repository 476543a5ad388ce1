"""Attention weights at a pause equal Hugging Face's eager attention weights of the layer the activation feeds."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import hf_forwards, plain_run
from djinn_kernel.errors import InvalidTargetError

PROMPT = list(range(5, 17))
NEW = 6


@pytest.fixture(scope="module")
def reference(backends):
    """Tokens of a plain run, and HF's eager attention weights of every layer at each forward of that run."""
    net, tokens, _ = plain_run(backends, PROMPT, NEW)
    before = net.config._attn_implementation
    net.set_attn_implementation("eager")
    try:
        forwards = hf_forwards(net, PROMPT, tokens[:-1], output_attentions=True)
        steps = [[a[0] for a in out.attentions] for out in forwards]
    finally:
        net.set_attn_implementation(before)
    return tokens, steps


@pytest.mark.parametrize("kind", ["inprocess", "daemon", "inprocess-fast"])
def test_attention_at_a_pause_is_the_next_layers(kind, backends, reference):
    tokens, steps = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        s.break_at(1, tokens=0)
        s.break_at(1, tokens=3)
        run = s.generate(PROMPT, NEW)
        for step in (0, 3):
            weights = run.pause.attention()
            assert weights.shape == steps[step][2].shape
            torch.testing.assert_close(weights, steps[step][2], atol=1e-5, rtol=0)
            run.resume()
        assert run.tokens == tokens


@pytest.mark.parametrize("kind", ["inprocess", "daemon"])
def test_input_side_edits_and_refusals(kind, backends, reference):
    tokens, steps = reference
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        s.break_at(2, side="input", tokens=2)
        run = s.generate(PROMPT, NEW)
        plain = run.pause.attention()
        torch.testing.assert_close(plain, steps[2][2], atol=1e-5, rtol=0)
        run.pause.scale(3.0)
        assert not torch.allclose(run.pause.attention(), plain), "the edited activation's attention"
        run.finish()
        s.delete()
        for target, side in ((model.num_layers - 1, "output"), ("model.layers.1.mlp", "output")):
            s.break_at(target, side=side, tokens=1)
            run = s.generate(PROMPT, 3)
            with pytest.raises(InvalidTargetError):
                run.pause.attention()
            run.finish()
            s.delete()
    gpt2 = dj.load("tiny-gpt2", backend=backends(kind))
    with gpt2.session() as s:
        s.break_at(0, tokens=0)
        run = s.generate(PROMPT, 2)
        with pytest.raises(InvalidTargetError, match="Llama-family"):
            run.pause.attention()
        run.finish()


def test_the_inspector_shows_the_weights_per_head(backends, reference):
    from djinn_widgets import ActivationInspector

    _, steps = reference
    model = dj.load("tiny-llama", backend=backends("inprocess"))
    with model.session() as s:
        s.break_at(1, tokens=0)
        run = s.generate(PROMPT, 2)
        inspector = ActivationInspector(run.pause)
        torch.testing.assert_close(inspector.weights, steps[0][2], atol=1e-5, rtol=0)
        assert inspector.head_control.options[0] == ("mean", -1) and len(inspector.head_control.options) == 5
        inspector.head_control.value = 2
        assert "layer 2 (head 2)" in inspector.attention_note.value
        shown = inspector.attention_figure.axes[0].images[0].get_array()
        torch.testing.assert_close(torch.as_tensor(shown.data), steps[0][2][2].float(), atol=1e-5, rtol=0)
        run.finish()
        s.delete()
        s.break_at(model.num_layers - 1, tokens=0)
        run = s.generate(PROMPT, 2)
        inspector = ActivationInspector(run.pause)
        assert inspector.weights is None and "no attention weights here" in inspector.attention_note.value
        assert inspector.attention_plot.layout.display == "none"
        run.finish()
