"""Activation patching: a run patched with its own recording is unchanged bit for bit, at a pause or by
``SetPromptRows`` steering; a sweep's grid equals patching each run at a pause and Hugging Face's forward with
the same rows written in by a hook; on the fast path the op keeps runs batched and equals the module path; the
heatmap shows that grid. The tests on the ``model`` fixture run on DJINN_TEST_BACKEND's engine."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from conftest import torch_model
from djinn_kernel.errors import InvalidArgumentError, InvalidTensorError
from djinn_kernel.patching import logit_difference, patch_sweep
from djinn_kernel.scheduler import fast_plan

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


def paused_sweep(model, clean, corrupted, metric, layers, positions) -> torch.Tensor:
    """The sweep as it was computed before it was batched: one run at a time, paused at the layer's output at the
    prefill and patched there (``Pause.patch``)."""
    values = torch.empty(len(layers), len(positions))
    with model.session() as source, model.session() as target:
        source.record(layers)
        clean_run = source.generate(clean, 1)
        clean_run.recorded  # noqa: B018 - fetched now, while it is the source session's run
        for i, layer in enumerate(layers):
            bp = target.break_at(layer, tokens=0)
            for j, position in enumerate(positions):
                run = target.generate(corrupted, 1, keep_logits=True)
                run.pause.patch(clean_run, [position])
                values[i, j] = metric(run.finish().logits[0])
            target.delete(bp)
    return values


def test_a_batched_sweep_equals_patching_each_run_at_a_pause(model):
    metric = logit_difference(7, 9)
    layers, positions = [0, model.num_layers - 1], [0, 3, 4, -1]
    seen: list[tuple[int, int]] = []
    grid = patch_sweep(model, CLEAN, CORRUPTED, metric, [0, -1], positions, lambda d, t: seen.append((d, t)))
    assert seen == [(d, 8) for d in range(1, 9)] and grid.positions == [0, 3, 4, len(CLEAN) - 1]
    assert grid.layers == layers
    expected = paused_sweep(model, CLEAN, CORRUPTED, metric, layers, grid.positions)
    alone = patch_sweep(model, CLEAN, CORRUPTED, metric, layers, positions, concurrent=1)
    assert torch.equal(alone.values, expected), "one run at a time: the same forwards, the same bits"
    assert grid.values[0, 1] != grid.corrupted, "patching a corrupted position changes the answer"
    assert grid.values[-1, -1].item() == pytest.approx(grid.clean, abs=1e-5), "the last layer's last row is the answer"
    if model.info["fast_path"] == "on":  # packed prefills: GEMMs over more rows round differently (runner.py)
        torch.testing.assert_close(grid.values, expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(grid.values, expected)


def test_steering_a_run_with_its_own_prompt_rows_changes_nothing(model):
    layers = [0, model.num_layers - 1]
    with model.session() as source, model.session() as target:
        source.record(layers)
        clean = source.generate(CLEAN, 6, keep_logits=True)
        for layer in layers:
            target.steer_with(layer, dj.SetPromptRows(range(-len(CLEAN), 0), clean.recorded[layer][: len(CLEAN)]))
        for _ in range(2):  # persistent: each run's prefill, and no decode step
            run = target.generate(CLEAN, 6, keep_logits=True)
            assert run.tokens == clean.tokens and torch.equal(run.logits, clean.logits)


@pytest.mark.parametrize("kind", ["inprocess-fast", "daemon-fast"])
def test_prompt_rows_on_the_fast_path_equal_the_module_path(kind, backends):
    gen = torch.Generator().manual_seed(0)
    rows, vector = torch.randn(2, 64, generator=gen), torch.randn(64, generator=gen)
    results = []
    for backend in (backends(kind), backends("inprocess")):
        model = dj.load("tiny-llama", backend=backend)
        with model.session() as s:
            s.steer_with(1, dj.SetPromptRows([2, -1], rows))
            s.steer(1, vector, alpha=0.5)  # added after the patch: the module path adds it to the patched rows too
            s.steer_with(2, dj.SetPromptRows([4], rows[:1]))
            run = s.generate(CORRUPTED, 8, keep_logits=True)
            results.append((run.tokens, run.logits))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    with dj.load("tiny-llama", backend=backends(kind)).session() as plain:
        assert plain.generate(CORRUPTED, 1, keep_logits=True).logits[0].ne(results[0][1][0]).any()


def test_a_sweep_packs_its_runs_into_shared_prefills_and_stays_on_the_fast_path(backends):
    engine = backends("inprocess-fast")
    model = dj.load("tiny-llama", backend=engine)
    scheduler = engine._models[model.info["id"]].scheduler
    before = scheduler.prefills
    grid = patch_sweep(model, CLEAN, CORRUPTED, logit_difference(7, 9), concurrent=8)
    runs = grid.values.numel() + 2  # and the clean and corrupted runs
    assert scheduler.prefills - before < runs, "some prefill packed several patched runs"
    with model.session() as s:
        s.steer_with(2, dj.SetPromptRows([1], torch.ones(1, 64)))
        state = engine._session(s.id)
        prefill, decode = fast_plan(state, 0), fast_plan(state, 1)
        assert list(prefill.patches) == [2] and prefill.patches[2][0][0] == (1,) and not prefill.stops
        assert decode.patches == {} and decode.steering == {}, "the decode steps are plain batched steps"


def test_bad_prompt_rows_are_refused_before_any_run(llama):
    hidden = llama.hidden_size
    with llama.session() as s:
        with pytest.raises(InvalidTensorError, match=r"shape \(3, 64\); expected \(2, 64\)"):
            s.steer_with(1, dj.SetPromptRows([0, 1], torch.zeros(3, hidden)))
        for positions in ([], [1.5], "0"):
            with pytest.raises(InvalidArgumentError, match="non-empty list of integers"):
                s.steer_with(1, dj.SetPromptRows(positions, torch.zeros(1, hidden)))
        s.steer_with(1, dj.SetPromptRows([len(CLEAN)], torch.zeros(1, hidden)))
        with pytest.raises(InvalidArgumentError, match="outside the prompt's 12 token positions"):
            s.generate(CLEAN, 1)
        s.unsteer()
        s.steer_with(1, dj.SetPromptRows([3, 3 - len(CLEAN)], torch.zeros(2, hidden)))
        with pytest.raises(InvalidArgumentError, match="name a prompt row twice"):
            s.generate(CLEAN, 1)
        s.unsteer()
        assert s.generate(CLEAN, 1).state == "finished", "no run was started: the session is idle"
    with pytest.raises(InvalidArgumentError, match="concurrent must be a positive integer"):
        patch_sweep(llama, CLEAN, CORRUPTED, logit_difference(7, 9), concurrent=0)
