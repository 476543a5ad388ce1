"""Activation patching: a run patched with its own recording is unchanged bit for bit; a sweep's grid equals
Hugging Face's forward with the same rows written in by a hook; the heatmap shows that grid."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import torch_model
from djinn_kernel.errors import InvalidArgumentError
from djinn_kernel.patching import logit_difference, patch_sweep

CLEAN = list(range(5, 17))
CORRUPTED = [*CLEAN[:3], 40, 41, *CLEAN[5:]]


@pytest.mark.parametrize("kind", ["inprocess", "daemon"])
def test_patching_a_run_with_its_own_recording_changes_nothing(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as source, model.session() as target:
        source.record([1, 2])
        clean = source.generate(CLEAN, 6, keep_logits=True)
        for layer, step in ((1, 0), (2, 3)):
            target.break_at(layer, tokens=step)
            run = target.generate(CLEAN, 6, keep_logits=True)
            run.pause.patch(clean)
            run.finish()
            assert run.tokens == clean.tokens and torch.equal(run.logits, clean.logits)
            target.delete()
        target.break_at(1, tokens=0)
        run = target.generate(CLEAN[:-1], 2)
        with pytest.raises(InvalidArgumentError, match="same length"):
            run.pause.patch(clean)
        with pytest.raises(InvalidArgumentError, match="recorded nothing"):
            run.pause.patch(run)
        run.cancel()
        source.generate(CLEAN, 1)
        with pytest.raises(InvalidArgumentError, match="released"):
            dj.api.Run(clean._backend, source, clean._snapshot).recorded  # noqa: B018 - a stale handle


def test_a_sweep_equals_hugging_face_with_the_rows_hooked_in(backends):
    engine = backends("inprocess")
    model = dj.load("tiny-llama", backend=engine)
    net = torch_model(engine, model)
    good, bad = 7, 9
    metric = logit_difference(good, bad)
    layers, positions = [0, 2], [3, -1]
    seen: list[tuple[int, int]] = []
    grid = patch_sweep(model, CLEAN, CORRUPTED, metric, layers, positions, on_progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4, 4) and grid.layers == layers and grid.positions == [3, len(CLEAN) - 1]

    with torch.inference_mode():
        hidden = net(torch.tensor([CLEAN]), output_hidden_states=True).hidden_states
        # the engine computes the last position's logits only (logits_to_keep): equal up to GEMM rounding
        assert grid.clean == pytest.approx(metric(net(torch.tensor([CLEAN])).logits[0, -1]), abs=1e-5)
        assert grid.corrupted == pytest.approx(metric(net(torch.tensor([CORRUPTED])).logits[0, -1]), abs=1e-5)
        for i, layer in enumerate(layers):
            for j, position in enumerate(grid.positions):
                def hook(module, args, output, layer=layer, position=position):
                    out = output[0] if isinstance(output, tuple) else output
                    out = out.clone()
                    out[0, position] = hidden[layer + 1][0, position]
                    return (out, *output[1:]) if isinstance(output, tuple) else out

                handle = net.model.layers[layer].register_forward_hook(hook)
                try:
                    expected = metric(net(torch.tensor([CORRUPTED])).logits[0, -1])
                finally:
                    handle.remove()
                assert grid.values[i, j].item() == pytest.approx(expected, abs=1e-5)
    assert grid.tokens == model.token_strings([CORRUPTED[3], CORRUPTED[-1]])

    from djinn_widgets import PatchHeatmap

    widget = PatchHeatmap(grid)
    ax = widget.figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2"] and len(ax.get_xticklabels()) == 2
    assert "share of the clean answer restored" in repr(widget) and torch.allclose(
        widget.share, (grid.values - grid.corrupted) / (grid.clean - grid.corrupted)
    )
    with pytest.raises(InvalidArgumentError, match="same number of tokens"):
        patch_sweep(model, CLEAN, CLEAN[:-1], metric)


@pytest.mark.parametrize("kind", ["inprocess", "daemon"])
def test_tokenize_gives_the_ids_a_prompt_is_made_of(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    ids = model.tokenize("hello world")
    assert ids and all(isinstance(t, int) for t in ids)
    assert "".join(model.token_strings(ids)).strip() == "hello world"
    with pytest.raises(InvalidArgumentError, match="string"):
        model.tokenize(["hello"])
