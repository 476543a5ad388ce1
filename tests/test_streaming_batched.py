"""Batched decode of a streamed model: the fast path's layer loop (runner.py) acquires each streamed layer from
the weight ring (streaming.py) once per step, for every session in the step.

References: the same runner over the same model fully resident (logits bitwise on the CPU in float32, same
rows), each session decoding alone on a resident fast engine (same tokens, as tests/test_fast_path.py asks of
a batch), the module path for steering, and the ring's own log (execution order, slot reuse, bytes per step).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import djinn_kernel as dj
from djinn_kernel.engine import Engine
from djinn_kernel.kv_blocks import BlockKV
from djinn_kernel.runner import DecodeRow, Runner, _take, fuse_layers, pieces
from djinn_kernel.streaming import packed_bytes, plan_for, stream_model
from test_fast_path import PROMPTS, concurrent_tokens
from test_streaming_weights import check_reuse_rule, streaming_budget

ROWS = [*PROMPTS, list(range(10, 14)), [7] * 9, list(range(90, 60, -3)), [1, 2, 3]]  # eight sessions


def tiny_llama(hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def streamed_runner(model: LlamaForCausalLM, resident: int = 2, slots: int = 2, fuse: bool = True):
    """``model`` with all but its last ``resident`` layers streamed through ``slots`` slots, and its runner."""
    if fuse:
        fuse_layers(model)
    layers = list(model.model.layers)
    in_layers = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    other = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) - in_layers
    plan = plan_for(model, layers, other + (resident + slots) * packed_bytes(layers[0]), slots)
    ring = stream_model(model, [f"model.layers.{i}" for i in range(len(layers))], plan, torch.device("cpu"))
    return ring, Runner(model, ring=ring)


# the runner over a ring ------------------------------------------------------------------------------------
def test_the_ring_packs_each_layer_fused_and_the_runner_reads_the_slot():
    model = tiny_llama()
    unfused = packed_bytes(model.model.layers[0])
    ring, runner = streamed_runner(model)
    assert runner.streamed == {0: 0, 1: 1, 2: 2} and runner.layers[0] is None and runner.layers[3] is not None
    assert ring.plan.arena_bytes == 3 * packed_bytes(model.model.layers[0]) <= 3 * unfused
    attn = model.model.layers[1].self_attn
    arena = ring.arena.untyped_storage().data_ptr()
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr() == arena
    ring.acquire(1)
    try:
        weights = _take(model.model.layers[1], fuse=False)
        slot = ring._holding[1].buffer
        assert weights.qkv.untyped_storage().data_ptr() == slot.untyped_storage().data_ptr(), "a view, not a copy"
        assert torch.equal(weights.qkv[: attn.q_proj.weight.shape[0]], attn.q_proj.weight)
    finally:
        ring.release(1)


def test_a_layer_streamed_unfused_is_refused_by_the_runner():
    """k_proj's 3,200 bytes are padded to 3,328 in the arena: q/k/v are no longer one tensor there."""
    with pytest.raises(ValueError, match="not fused"):
        streamed_runner(tiny_llama(hidden=40), fuse=False)


def test_eight_rows_step_together_over_streamed_layers_bit_for_bit_and_stream_each_layer_once():
    model = tiny_llama()
    reference = Runner(copy.deepcopy(model))
    ring, runner = streamed_runner(model)
    kvs, ref_kvs = [runner.new_kv() for _ in ROWS], [reference.new_kv() for _ in ROWS]
    logits = runner.prefill([(kv, ids, {}) for kv, ids in zip(kvs, ROWS)])
    assert torch.equal(logits, reference.prefill([(kv, ids, {}) for kv, ids in zip(ref_kvs, ROWS)]))
    steer = {1: torch.linspace(-1, 1, 64)}  # a streamed layer's output, steered in some rows
    for step in range(6):
        forwards, copied = ring.forwards, ring.bytes_copied
        tokens = logits.argmax(-1).tolist()
        logits = runner.decode([DecodeRow(kv, t, steer if b % 3 == 0 else {}) for b, (kv, t) in enumerate(zip(kvs, tokens))])
        expected = reference.decode(
            [DecodeRow(kv, t, steer if b % 3 == 0 else {}) for b, (kv, t) in enumerate(zip(ref_kvs, tokens))]
        )
        assert torch.equal(logits, expected), f"step {step}"
        assert ring.forwards == forwards + 1, "one forward of the ring for eight sessions"
        assert ring.per_forward[-1] == ring.plan.arena_bytes, "each streamed layer copied once per step"
        assert ring.bytes_copied - copied == ring.plan.arena_bytes
    loads = [(e.layer, e.slot) for e in ring.log if e.kind == "load"]
    assert [layer for layer, _ in loads] == [i % 3 for i in range(len(loads))], "execution order, cyclically"
    assert [slot for _, slot in loads] == [i % 2 for i in range(len(loads))]
    assert [e.layer for e in ring.log if e.kind == "acquire"] == [0, 1, 2] * 7 and ring.demand_loads == 0
    check_reuse_rule(ring.log)
    assert all(slot.readers == 0 for slot in ring.slots) and not ring._pins


def test_a_step_that_fails_inside_a_streamed_layer_gives_its_slot_back():
    ring, runner = streamed_runner(tiny_llama())
    kv = runner.new_kv()
    runner.prefill([(kv, ROWS[0], {})])

    def fail(*args: object) -> torch.Tensor:
        raise RuntimeError("a kernel failed")

    runner.mlp = fail  # the MLP half of streamed layer 0 raises, after its acquire
    with pytest.raises(RuntimeError, match="kernel failed"):
        runner.decode([DecodeRow(kv, 5)])
    assert all(slot.readers == 0 for slot in ring.slots) and not ring._pins
    check_reuse_rule(ring.log)


def test_a_span_is_cut_where_streamed_and_resident_layers_meet():
    assert pieces(0, 4, {0, 1, 2}) == [(0, 2, True), (3, 4, False)]
    assert pieces(2, 3, {0, 1, 2}) == [(2, 2, True), (3, 3, False)]
    assert pieces(3, 4, {0, 1, 2}) == [(3, 4, False)]
    assert pieces(0, 2, {0, 1, 2}) == [(0, 2, True)]
    assert pieces(5, 4, {0, 1, 2}) == [(5, 4, False)], "only the logits remain"


# a streamed model served by a fast engine --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_streamed():
    engine = Engine(device="cpu", fast=True, weight_memory=streaming_budget("tiny-llama", 1))
    model = dj.load("tiny-llama", backend=engine)
    yield engine, model, engine._model("tiny-llama")
    engine.shutdown()


def test_a_fast_engine_batches_a_streamed_model(fast_streamed):
    _, model, loaded = fast_streamed
    assert model.info["fast_path"] == "on" and model.info["streaming"]["streamed_layers"] == [0, 1, 2]
    assert loaded.scheduler.runner.ring is loaded.ring


def test_sessions_decoding_at_once_get_their_resident_tokens_and_share_each_copy(fast_streamed, backends):
    _, model, loaded = fast_streamed
    resident = dj.load("tiny-llama", backend=backends("inprocess-fast"))
    alone = []
    for prompt in ROWS:
        with resident.session() as s:
            alone.append(s.generate(prompt, 24).tokens)
    ring, scheduler = loaded.ring, loaded.scheduler
    forwards, steps, prefills, rows = ring.forwards, scheduler.steps, scheduler.prefills, scheduler.batched_rows
    assert concurrent_tokens(model, ROWS, 24) == alone
    new_steps = scheduler.steps - steps
    assert scheduler.batched_rows - rows > new_steps, "some steps decoded several sessions"
    assert ring.forwards - forwards == new_steps + scheduler.prefills - prefills, "one ring forward per step"
    assert set(list(ring.per_forward)[-(ring.forwards - forwards):]) == {ring.plan.arena_bytes}
    check_reuse_rule(ring.log)


def test_a_pause_at_a_streamed_layer_stays_batched_holds_no_slot_and_pages_exactly(fast_streamed):
    engine, model, loaded = fast_streamed
    with model.session() as ref:
        expected = ref.generate(PROMPTS[3], 8, keep_logits=True)
        expected_tokens, expected_logits = expected.tokens, expected.logits
    with model.session() as s, model.session() as other:
        s.break_at(1, tokens=(2, 5))
        run = s.generate(PROMPTS[3], 8, keep_logits=True)
        pauses = 0
        while run.paused:
            assert isinstance(engine._session(s.id).cache, BlockKV), "paused on the fast path, not handed over"
            assert [slot.readers for slot in loaded.ring.slots] == [0, 0], "a pause after a layer holds no slot"
            assert other.generate(PROMPTS[1], 6).state == "finished", "the others decode meanwhile"
            assert s.page_out()["bytes"] > 0 and s.status()["state"] == "paged"
            pauses += 1
            run.resume()
        assert pauses == 4 and run.tokens == expected_tokens and torch.equal(run.logits, expected_logits)


def test_a_run_handed_to_the_module_path_inside_a_streamed_layer_shares_the_ring(fast_streamed):
    """A breakpoint inside layer 1's MLP moves the run to the module path, whose hooks pin layer 1's slot while it
    waits; a batched session meanwhile goes through the other slot, and both give the unpaused tokens."""
    _, model, loaded = fast_streamed
    with model.session() as ref:
        expected = [ref.generate(prompt, 10).tokens for prompt in PROMPTS[:2]]
    with model.session() as held, model.session() as other:
        held.break_at("model.layers.1.mlp", tokens=3)
        run = held.generate(PROMPTS[0], 10)
        assert run.paused and run.pause.token_step == 3 and run.tokens == expected[0][:3]
        assert [(slot.layer, slot.readers) for slot in loaded.ring.slots if slot.readers] == [(1, 1)]
        assert other.generate(PROMPTS[1], 10).tokens == expected[1]
        run.finish()
        assert run.tokens == expected[0]
    check_reuse_rule(loaded.ring.log)


def test_steering_a_streamed_layer_on_the_fast_path_matches_the_module_path(fast_streamed):
    _, model, _ = fast_streamed
    deterministic = Engine(device="cpu", deterministic=True, weight_memory=streaming_budget("tiny-llama", 1))
    try:
        results = []
        for m in (model, dj.load("tiny-llama", backend=deterministic)):
            with m.session() as s:
                s.steer(1, torch.linspace(-1, 1, 64), alpha=3.0)
                results.append(s.generate(PROMPTS[2], 12).tokens)
        assert results[0] == results[1]
    finally:
        deterministic.shutdown()


def test_concurrent_solo_and_batched_steps_keep_the_ring_consistent(fast_streamed):
    """Sessions stepping alone (a breakpoint armed at every token) and batched ones at once, on their threads."""
    _, model, loaded = fast_streamed
    with model.session() as ref:
        expected = ref.generate(PROMPTS[0], 12).tokens
    out: dict[int, list[int]] = {}

    def drive(i: int) -> None:
        with model.session() as s:
            if i % 2:
                s.break_at(2)
            run = s.generate(PROMPTS[0], 12)
            while run.paused:
                run.resume()
            out[i] = run.tokens

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(4)] == [expected] * 4
    assert all(slot.readers == 0 for slot in loaded.ring.slots)
    check_reuse_rule(loaded.ring.log)


def test_through_a_fast_daemon_a_streamed_model_batches_with_its_resident_tokens(backends):
    from daemon_util import DaemonProcess

    resident = dj.load("tiny-llama", backend=backends("inprocess-fast"))
    alone = []
    for prompt in PROMPTS:
        with resident.session() as s:
            alone.append(s.generate(prompt, 16).tokens)
    process = DaemonProcess("--fast", "on", "--weight-memory", str(streaming_budget("tiny-llama", 1)))
    try:
        client = process.client()
        model = dj.load("tiny-llama", backend=client)
        assert model.info["fast_path"] == "on" and model.info["streaming"]["streamed_layers"] == [0, 1, 2]
        assert concurrent_tokens(model, PROMPTS, 16) == alone
        stats = client.status()["models"][0]["streaming"]
        assert stats["bytes_per_token"] == stats["arena_bytes"], "a batched step copies each streamed layer once"
    finally:
        process.stop()
