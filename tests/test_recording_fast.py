"""Recording on the fast path: decoder-layer outputs kept from the runner's layer loop (taps.py) stay in the batch,
give the module path's rows, change no token, and fill only the rows of forwards that succeeded."""

from __future__ import annotations

import threading

import pytest
import torch

import djinn_kernel as dj
from djinn_kernel.kv_blocks import BlockKV
from djinn_kernel.runner import DecodeRow, Runner
from djinn_kernel.taps import Tap
from test_fast_path import tiny_gqa_llama

PROMPT = list(range(5, 17))
OTHER = list(range(40, 67))
NEW = 8
LAYERS = [0, "model.layers.2"]


def recorded_run(backend, prompt: list[int], layers: list, **record) -> tuple[list[int], torch.Tensor, dict, bool]:
    """A run of ``prompt`` recording ``layers``: its tokens, logits, rows and whether it stayed on the fast path."""
    model = dj.load("tiny-llama", backend=backend)
    with model.session() as s:
        s.record(layers, **record)
        run = s.generate(prompt, NEW, keep_logits=True)
        return run.tokens, run.logits, run.recorded, isinstance(backend._session(s.id).cache, BlockKV)


@pytest.fixture(scope="module")
def module_path(backends):
    """The module path's run and rows (hooks on Hugging Face's layers): what the fast path must give."""
    tokens, logits, rows, fast = recorded_run(backends("inprocess"), PROMPT, LAYERS)
    assert not fast
    return tokens, logits, rows


def test_layer_recordings_stay_on_the_fast_path_with_the_module_paths_rows(backends, module_path):
    tokens, logits, expected = module_path
    engine = backends("inprocess-fast")
    scheduler = engine._models[dj.load("tiny-llama", backend=engine).info["id"]].scheduler
    with dj.load("tiny-llama", backend=engine).session() as plain:
        run = plain.generate(PROMPT, NEW, keep_logits=True)
        plain_tokens, plain_logits = run.tokens, run.logits
    prefills, steps = scheduler.prefills, scheduler.steps
    got_tokens, got_logits, rows, fast = recorded_run(engine, PROMPT, LAYERS)
    assert fast and scheduler.prefills == prefills + 1 and scheduler.steps - steps == NEW - 1, "on the fast path"
    assert got_tokens == plain_tokens and torch.equal(got_logits, plain_logits), "recording changes nothing"
    assert got_tokens == tokens and torch.equal(got_logits, logits)
    assert rows[0].shape == (len(PROMPT) + NEW - 1, 64)
    for key in (0, "model.layers.0", 2, "model.layers.2"):
        assert torch.equal(rows[key], expected[key]), key


def test_chosen_prompt_positions_on_the_fast_path(backends):
    rows = {}
    for kind in ("inprocess", "inprocess-fast"):
        _, _, got, fast = recorded_run(backends(kind), PROMPT, [1], positions=[0, -1])
        assert fast == kind.endswith("fast")
        rows[kind] = got[1]
    assert rows["inprocess-fast"].shape == (2 + NEW - 1, 64)
    assert torch.equal(rows["inprocess-fast"], rows["inprocess"])


def test_a_recording_session_batched_with_others_sends_only_its_own_rows(backends, module_path):
    tokens, _, expected = module_path
    engine = backends("inprocess-fast")
    model = dj.load("tiny-llama", backend=engine)
    scheduler = engine._models[model.info["id"]].scheduler
    with model.session() as s:
        alone = s.generate(OTHER, 3 * NEW).tokens
    steps, batched = scheduler.steps, scheduler.batched_rows
    recorder, others = model.session(), [model.session() for _ in range(2)]
    recorder.record(LAYERS)
    barrier = threading.Barrier(3)
    out = {}

    def drive(name: str, session: dj.Session, prompt: list[int], n: int) -> None:
        barrier.wait()
        out[name] = session.generate(prompt, n)

    threads = [threading.Thread(target=drive, args=("rec", recorder, PROMPT, NEW))]
    threads += [threading.Thread(target=drive, args=(i, s, OTHER, 3 * NEW)) for i, s in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scheduler.batched_rows - batched > scheduler.steps - steps, "some step decoded several sessions"
    assert out["rec"].tokens == tokens and out[0].tokens == out[1].tokens == alone
    for key in (0, 2):  # packed and batched GEMMs round differently from one row's: float rounding, not bits
        assert torch.allclose(out["rec"].recorded[key], expected[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(dj.InvalidArgumentError, match="recorded nothing"):
        out[0].recorded  # noqa: B018
    for s in (recorder, *others):
        s.close()


@pytest.mark.parametrize("how", ["resume", "edit", "step"])
def test_a_pause_mid_run_records_what_the_module_path_records(how, backends):
    """Paused at a recorded layer (the solo step's cut) at the prefill and at a later step, then resumed, edited
    there, or stepped layer by layer to the end: the rows are the module path's, bit for bit."""
    got = {}
    for kind in ("inprocess", "inprocess-fast"):
        backend = backends(kind)
        with dj.load("tiny-llama", backend=backend).session() as s:
            s.record([1, 2])
            s.break_at(2, tokens=(0, 3))
            run = s.generate(PROMPT, NEW)
            pauses = 0
            while run.paused:
                pauses += 1
                if how == "edit":
                    run.pause.scale(0.5)
                run.step() if how == "step" else run.resume()
            assert isinstance(backend._session(s.id).cache, BlockKV) == kind.endswith("fast")
            got[kind] = pauses, run.tokens, run.recorded
    (pauses, tokens, rows), (fast_pauses, fast_tokens, fast_rows) = got["inprocess"], got["inprocess-fast"]
    assert fast_pauses == pauses > 1 and fast_tokens == tokens
    for key in (1, 2):
        assert torch.equal(fast_rows[key], rows[key]), key


def test_a_submodule_recording_takes_the_module_path(backends):
    _, _, rows, fast = recorded_run(backends("inprocess-fast"), PROMPT, [1, "model.layers.2.mlp"])
    assert not fast and rows[1].shape == rows["model.layers.2.mlp"].shape


def test_the_runner_sends_each_tapping_rows_layer_output_and_no_other():
    """Packed prefill and batched decode, one row tapping and one not: the tapped rows are the layer outputs
    Hugging Face computes for that row alone."""
    model = tiny_gqa_llama()
    runner = Runner(model)
    kvs = [runner.new_kv(), runner.new_kv()]
    prompts = [PROMPT, OTHER]
    prompt_rows = torch.zeros(2, 64)
    runner.prefill([(kv, p, {}) for kv, p in zip(kvs, prompts)], taps=[{1: Tap(prompt_rows, [0, len(PROMPT) - 1])}, {}])
    step_row = torch.zeros(1, 64)
    runner.decode([DecodeRow(kvs[0], 7, taps={1: Tap(step_row)}), DecodeRow(kvs[1], 9)])
    with torch.inference_mode():
        hidden = model(torch.tensor([[*PROMPT, 7]]), output_hidden_states=True).hidden_states[2][0]
    assert torch.allclose(prompt_rows, hidden[[0, len(PROMPT) - 1]], rtol=1e-5, atol=1e-5)
    assert torch.allclose(step_row, hidden[-1:], rtol=1e-5, atol=1e-5)
