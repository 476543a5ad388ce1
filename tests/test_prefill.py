"""Chunked prefill and the reservation of a prompt's activations (prefill.py; issue 13's admission control).

A prompt longer than the engine's ``prefill_chunk`` is fed in forwards of that many tokens on both paths, giving
the tokens a whole prompt gives; a run is admitted with its KV and its prompt's activations reserved (one
chunk's when chunked, the whole prompt's when something must see its forward whole), and the activations'
share goes back once the prompt is in.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

import djinn_kernel as dj
from conftest import DEVICE
from djinn_kernel.engine import Engine
from djinn_kernel.memory import LRUPolicy, MemoryManager, MiB
from djinn_kernel.prefill import pieces

pytestmark = pytest.mark.inprocess

IDS = [(7 * i + 3) % 90 + 5 for i in range(45)]
NEW = 6
CHUNK = 8


def engine(fast: bool, chunk: int, budget: int = 1 << 40) -> Engine:
    memory = MemoryManager(torch.device(DEVICE), budget, 1 << 30, LRUPolicy(), chunk_bytes=MiB)
    return Engine(device=DEVICE, memory=memory, fast=fast, deterministic=not fast, prefill_chunk=chunk)


def run_ids(backend: Engine, name: str = "tiny-llama", **breaks) -> tuple[list[int], torch.Tensor]:
    model = dj.load(name, backend=backend)
    with model.session() as s:
        if breaks:
            s.break_at(1, **breaks)
        run = s.generate(IDS, NEW, keep_logits=True)
        while run.paused:
            run.resume()
        return run.tokens, run.logits


def test_pieces_cut_at_fixed_boundaries():
    assert pieces(45, 8) == [8, 8, 8, 8, 8, 5]
    assert pieces(16, 8) == [8, 8]
    assert pieces(8, 8) == [8]
    assert pieces(45, None) == [45]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_module_path_feeds_a_long_prompt_in_chunks_with_the_tokens_of_a_whole_one(name):
    whole, chunked = engine(False, 10_000), engine(False, CHUNK)
    tokens, logits = run_ids(whole, name)
    fed: list[int] = []
    model = dj.load(name, backend=chunked)
    net = chunked._model(model.info["id"]).model
    handle = net.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    try:
        got, got_logits = run_ids(chunked, name)
    finally:
        handle.remove()
    assert fed == [*pieces(len(IDS), CHUNK), *[1] * (NEW - 1)], "the prompt went in chunks, then one token a step"
    assert got == tokens
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    whole.shutdown(), chunked.shutdown()


def test_fast_path_feeds_a_long_prompt_one_chunk_per_step_with_the_tokens_of_a_whole_one():
    whole, chunked = engine(True, 10_000), engine(True, CHUNK)
    tokens, logits = run_ids(whole)
    scheduler = chunked._model(dj.load("tiny-llama", backend=chunked).info["id"]).scheduler
    got, got_logits = run_ids(chunked)
    assert scheduler.prefills == math.ceil(len(IDS) / CHUNK)
    assert got == tokens
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    whole.shutdown(), chunked.shutdown()


def test_fast_path_decodes_other_runs_in_a_long_prompts_chunks():
    backend = engine(True, CHUNK)
    model = dj.load("tiny-llama", backend=backend)
    runner = backend._model(model.info["id"]).scheduler.runner
    forwards: list[list[int]] = []  # the tokens each row of each packed forward fed
    prefill = runner.prefill
    runner.prefill = lambda rows, *a, **k: forwards.append([len(ids) for _, ids, _ in rows]) or prefill(rows, *a, **k)
    started = threading.Event()
    with model.session() as a, model.session() as b:
        def long_decode() -> None:
            a.generate(IDS[:5], 120, on_progress=lambda progress: started.set())

        thread = threading.Thread(target=long_decode)
        thread.start()
        started.wait()
        run = b.generate(IDS, NEW)
        thread.join()
        assert run.state == "finished" and a.run.state == "finished" and len(a.run.tokens) == 120
        rode = a.run.timing["others_prefills"]
    chunks = [rows for rows in forwards[1:] if max(rows) > 1]  # A's prompt, then B's chunks
    assert [max(rows) for rows in chunks] == pieces(len(IDS), CHUNK)
    assert all(sorted(rows) == [1, max(rows)] for rows in chunks), "A decoded one token in each of B's chunks"
    assert rode == len(chunks), "A's timing counts the chunks it rode"
    backend.shutdown()


@pytest.mark.parametrize("fast", [False, True])
def test_a_run_reserves_its_prompts_activations_and_returns_them_once_the_prompt_is_in(fast):
    backend = engine(fast, CHUNK)
    model = dj.load("tiny-llama", backend=backend)
    loaded = backend._model(model.info["id"])
    kv = loaded.kv_bytes(len(IDS) + NEW, fast)  # whole blocks on the fast path
    with model.session() as s:
        s.break_at(1, tokens=[0, 1])  # seen whole at step 0: the prompt's forward is not chunked
        run = s.generate(IDS, NEW)
        assert run.paused and run.pause.token_step == 0
        whole = loaded.prefill_bytes(len(IDS), len(IDS), fast)
        assert backend.memory.session(s.id).reserved == kv + whole
        run.resume()
        assert run.paused and run.pause.token_step == 1
        held = backend.memory.session(s.id).reserved
        assert kv <= held < kv + whole, "the prompt is in: its activations' room went back"
        run.finish()
    with model.session() as s:
        s.break_at(1, tokens=1)  # nothing sees token step 0: chunked
        run = s.generate(IDS, NEW)
        assert run.paused and run.pause.token_step == 1
        assert kv <= backend.memory.session(s.id).reserved < kv + whole
        run.finish()
    assert loaded.prefill_bytes(CHUNK, len(IDS), fast) < whole
    backend.shutdown()


@pytest.mark.parametrize("fast", [False, True])
def test_a_prompt_fed_whole_that_cannot_fit_is_refused_clearly_and_a_chunked_one_runs(fast):
    probe = engine(fast, CHUNK)
    loaded = probe._model(dj.load("tiny-llama", backend=probe).info["id"])
    kv = loaded.kv_bytes(len(IDS) + NEW, fast)
    chunk, whole = loaded.prefill_bytes(CHUNK, len(IDS), fast), loaded.prefill_bytes(len(IDS), len(IDS), fast)
    probe.shutdown()
    backend = engine(fast, CHUNK, budget=kv + (chunk + whole) // 2)
    model = dj.load("tiny-llama", backend=backend)
    with model.session() as s:
        s.break_at(1, tokens=0)
        with pytest.raises(dj.OutOfMemoryError, match="fed whole, not in chunks"):
            s.generate(IDS, NEW)
        s.delete()
        run = s.generate(IDS, NEW)
        assert run.state == "finished" and len(run.tokens) == NEW
    backend.shutdown()


def test_prefill_chunk_must_be_a_positive_integer():
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(dj.InvalidArgumentError, match="prefill_chunk"):
            Engine(device=DEVICE, prefill_chunk=bad)
