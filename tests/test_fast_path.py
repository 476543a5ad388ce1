"""The batched fast path: a runner that owns the layer loop, a scheduler that batches every session's decode.

References: Hugging Face's own forward (the runner's logits on the CPU in float32 must equal it), a session
decoding alone (a batch must give it the same tokens), and the module path (steering and hand-over to a
breakpoint must give what the debugger gives).
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import djinn_kernel as dj
from djinn_kernel.engine import Engine
from djinn_kernel.runner import DecodeRow, Runner, unsupported_reason

PROMPTS = [list(range(5, 21)), list(range(40, 47)), [3, 9, 27, 81, 50, 60], list(range(60, 90))]


def tiny_gqa_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_the_runner_reproduces_hugging_face_bit_for_bit_on_the_cpu():
    model = tiny_gqa_llama()
    prompt = PROMPTS[0]
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    runner = Runner(model)
    kv = runner.new_kv()
    logits = [runner.prefill([(kv, prompt, {})])[0]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(11):
        logits.append(runner.decode([DecodeRow(kv, tokens[-1])])[0])
        tokens.append(int(logits[-1].argmax()))
    assert tokens == ref.sequences[0, len(prompt):].tolist()
    assert torch.equal(torch.stack(logits), torch.stack([step[0] for step in ref.logits]))
    assert kv.length == len(prompt) + 11, "the last token is pending: no forward has consumed it yet"


def test_hugging_face_modules_keep_working_on_the_fused_weights():
    model = tiny_gqa_llama()
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        before = model(ids).logits
        Runner(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()


def test_models_without_the_llama_structure_take_the_module_path():
    engine = Engine(device="cpu", fast=True)
    try:
        gpt2 = dj.load("tiny-gpt2", backend=engine)
        assert gpt2.info["fast_path"].startswith("unavailable")
        with gpt2.session() as s:
            assert len(s.generate(PROMPTS[0], 4).tokens) == 4
        assert dj.load("tiny-llama", backend=engine).info["fast_path"] == "on"
    finally:
        engine.shutdown()
    assert unsupported_reason(torch.nn.Linear(2, 2)) is not None


def concurrent_tokens(model: dj.Model, prompts: list[list[int]], n: int) -> list[list[int]]:
    sessions = [model.session() for _ in prompts]
    barrier = threading.Barrier(len(prompts))
    out: dict[int, list[int]] = {}

    def drive(i: int) -> None:
        barrier.wait()
        out[i] = sessions[i].generate(prompts[i], n).tokens

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["inprocess-fast", "daemon-fast"])
def test_sessions_decoding_at_once_get_the_tokens_they_get_alone(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    alone = []
    for prompt in PROMPTS:
        with model.session() as s:
            alone.append(s.generate(prompt, 24).tokens)
    assert concurrent_tokens(model, PROMPTS, 24) == alone


def test_concurrent_sessions_share_decode_steps(backends):
    engine = backends("inprocess-fast")
    model = dj.load("tiny-llama", backend=engine)
    scheduler = engine._models[model.info["id"]].scheduler
    steps, rows = scheduler.steps, scheduler.batched_rows
    concurrent_tokens(model, PROMPTS, 40)
    assert scheduler.batched_rows - rows > scheduler.steps - steps, "some step decoded several sessions"


@pytest.mark.parametrize("kind", ["inprocess-fast", "daemon-fast"])
def test_a_paused_session_never_blocks_the_others(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as ref:
        expected = ref.generate(PROMPTS[0], 10).tokens
    with model.session() as paused, model.session() as other:
        paused.break_at(1, tokens=3)
        run = paused.generate(PROMPTS[0], 10)
        assert run.paused and run.token_step == 3 and run.tokens == expected[:3]
        assert other.generate(PROMPTS[1], 30).state == "finished", "finished while the other waits at its pause"
        run.finish()
        assert run.tokens == expected, "handed over to the module path mid-run, same tokens"


@pytest.mark.parametrize("kind", ["inprocess-fast", "daemon-fast"])
def test_steering_on_the_fast_path_matches_the_module_path(kind, backends):
    vector = torch.linspace(-1, 1, 64)
    results = []
    for backend in (backends(kind), backends("inprocess")):
        model = dj.load("tiny-llama", backend=backend)
        with model.session() as s:
            s.steer(2, vector, alpha=3.0)
            results.append(s.generate(PROMPTS[2], 12).tokens)
    assert results[0] == results[1]
    with dj.load("tiny-llama", backend=backends(kind)).session() as plain:
        assert plain.generate(PROMPTS[2], 12).tokens != results[0], "the steering changes the continuation"


@pytest.mark.parametrize("kind", ["inprocess-fast", "daemon-fast", "inprocess"])
def test_a_run_says_where_its_time_went_on_the_fast_path(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        run = s.generate(PROMPTS[0], 6)
        if kind == "inprocess":
            assert run.timing is None, "the module path does not split its time"
            return
        timing = run.timing
        assert timing["decode_steps"] == 5, "the first token comes from the prefill, each other from a step"
        assert timing["prefill_s"] > 0 and timing["decode_s"] > 0 and timing["solo_s"] == 0
        assert 0 < timing["admit_s"] < timing["prefill_s"] + timing["decode_s"], "admitting a tiny run is quick"
        s.break_at(1, tokens=2)
        paused = s.generate(PROMPTS[0], 6)
        paused.finish()
        assert paused.timing["solo_s"] > 0 and paused.timing["decode_steps"] == 4, "step 2 ran alone"


def test_fast_and_deterministic_exclude_each_other():
    with pytest.raises(dj.InvalidArgumentError, match="pick one"):
        Engine(device="cpu", fast=True, deterministic=True)


def test_a_pause_at_a_layer_keeps_the_run_on_the_fast_path_and_pages_exactly(backends):
    from djinn_kernel.kv_blocks import BlockKV

    engine = backends("inprocess-fast")
    model = dj.load("tiny-llama", backend=engine)
    with model.session() as ref:
        expected = ref.generate(PROMPTS[3], 8, keep_logits=True)
        expected_logits = expected.logits
    with model.session() as s:
        s.break_at(2, tokens=(2, 5))
        run = s.generate(PROMPTS[3], 8, keep_logits=True)
        pauses = 0
        while run.paused:
            assert isinstance(engine._session(s.id).cache, BlockKV), "paused on the fast path, not handed over"
            moved = s.page_out()
            assert moved["bytes"] > 0 and s.status()["state"] == "paged"
            pauses += 1
            run.resume()
        assert pauses == 4 and run.tokens == expected.tokens
        assert torch.equal(run.logits, expected_logits), "pauses and paging leave no trace, bit for bit"


def test_a_fast_path_run_reserves_whole_blocks_so_its_step_never_pages_another_session_out():
    """The fast path's KV comes in blocks of 32 positions. A run admitted with its exact token count outgrew its
    reservation at its last block, and the memory manager paged another session out from the step loop, holding
    up every row of the batch (11-33 ms steps seen on the H200 under pressure). Whole blocks are reserved now: the
    other session is paged at admission, and nothing pages from the step loop."""
    engine = Engine(device="cpu", fast=True)
    model = dj.load("tiny-llama", backend=engine)
    loaded = engine._model(model.info["id"])
    per_token = model.info["kv_bytes_per_token"]
    assert loaded.kv_bytes(34, fast=True) == 64 * per_token and loaded.kv_bytes(34, fast=False) == 34 * per_token
    prompt, new = [7, 8, 9, 10, 11], 29  # 33 positions of KV: a second block for the last one
    with model.session() as reference:
        expected = reference.generate(prompt, new).tokens
    with model.session() as other, model.session() as s:
        other.generate(list(range(5, 25)), 4)
        memory = engine.memory
        exact = per_token * (len(prompt) + new) + loaded.prefill_bytes(len(prompt), len(prompt), True)
        memory.budget = memory.charged_total() + 64 * per_token - 1
        assert memory.charged_total() + exact <= memory.budget, "an exact reservation would have been admitted"
        before = memory.stats()
        assert s.generate(prompt, new).tokens == expected
        after = memory.stats()
        assert after["page_outs"] - before["page_outs"] == 1 and other.status()["memory"]["paged"]
        assert after["growth_page_outs"] == 0 and after["overcommits"] == 0
