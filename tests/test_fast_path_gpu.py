"""The fast path's CUDA parts (Triton kernels, graph spans), on a GPU: ``pytest tests/test_fast_path_gpu.py`` on the
device machine. Skipped without CUDA; the CPU tests cover the same logic through the eager reference step."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and Triton)"),
    # torch 2.11 (the GPU image's) warns from its own TorchScript internals when torch.compile first runs
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

PROMPT = [int(t) for t in torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("rows", [1, 64])  # split-K attention at 1 row, one program per (row, kv head) at 64
def test_triton_attention_and_graphs_match_hugging_face(tiny, rows):
    from djinn_kernel.runner import DecodeRow, Runner

    with torch.inference_mode():
        ref = tiny.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=30, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    expected = torch.stack([step[0] for step in ref.logits]).float()
    runner = Runner(tiny)
    kvs = [runner.new_kv() for _ in range(rows)]
    logits = [runner.prefill([(kv, PROMPT, {}) for kv in kvs])]
    for _ in range(29):
        tokens = logits[-1].argmax(-1).tolist()
        logits.append(runner.decode([DecodeRow(kv, t) for kv, t in zip(kvs, tokens)]).clone())
    got = torch.stack(logits).float()  # [steps, rows, vocab]
    assert (got - expected[:, None]).abs().max() < 2e-3, "float32 with TF32 dot products in the kernels"
    assert got[:, 0].argmax(-1).tolist() == ref.sequences[0, len(PROMPT):].tolist()


def test_pauses_and_steps_through_graph_spans_are_exact(tiny):
    from djinn_kernel.api import Model
    from djinn_kernel.engine import Engine

    engine = Engine(device="cuda", fast=True)
    try:
        model = Model(engine, engine.register_model("tiny", tiny))
        with model.session() as s:
            ref = s.generate(PROMPT, 20, keep_logits=True)
            ref_tokens, ref_logits = ref.tokens, ref.logits
            s.break_at(2)
            run = s.generate(PROMPT, 20, keep_logits=True)
            while run.paused:
                run.resume()
            assert run.tokens == ref_tokens and torch.equal(run.logits, ref_logits)
            s.delete()
            s.break_at(1, tokens=3)
            run = s.generate(PROMPT, 20, keep_logits=True)
            assert run.step().pause.layer == 2 and run.step().pause.layer == 3
            run.finish()
            assert run.tokens == ref_tokens and torch.equal(run.logits, ref_logits)
    finally:
        engine.shutdown()


def test_a_patch_sweep_in_packed_prefills_matches_patching_at_pauses(tiny):
    """tests/test_patching.py on the GPU: one patched run at a time equals the pause-based sweep bit for bit, packed
    prefills agree to float rounding, and a run steered with its own prompt rows is unchanged."""
    from test_patching import paused_sweep

    from djinn_kernel.api import Model
    from djinn_kernel.edits import SetPromptRows
    from djinn_kernel.engine import Engine
    from djinn_kernel.patching import logit_difference, patch_sweep

    engine = Engine(device="cuda", fast=True)
    try:
        model = Model(engine, engine.register_model("tiny", tiny))
        corrupted = [*PROMPT[:10], 5, 6, *PROMPT[12:]]
        metric, layers, positions = logit_difference(3, 4), [0, 2], [9, 10, 11, len(PROMPT) - 1]
        alone = patch_sweep(model, PROMPT, corrupted, metric, layers, positions, concurrent=1)
        assert torch.equal(alone.values, paused_sweep(model, PROMPT, corrupted, metric, layers, positions))
        packed = patch_sweep(model, PROMPT, corrupted, metric, layers, positions, concurrent=8)
        assert (packed.values - alone.values).abs().max() < 2e-3
        with model.session() as source, model.session() as target:
            source.record([1])
            rows = source.generate(PROMPT, 1).recorded[1]
            plain = target.generate(PROMPT, 8, keep_logits=True)
            plain_tokens, plain_logits = plain.tokens, plain.logits
            target.steer_with(1, SetPromptRows(list(range(len(PROMPT))), rows))
            run = target.generate(PROMPT, 8, keep_logits=True)
            assert run.tokens == plain_tokens and torch.equal(run.logits, plain_logits)
    finally:
        engine.shutdown()


def test_recordings_are_staged_in_the_graphs_and_change_no_token(tiny):
    """Layers 1 and 3 recorded: in the batched step's graph, and in solo spans cut at a pause at layer 3 (a
    recorded layer ending a span, edited there) and at layer 2 (recorded layers inside spans). The tokens are the
    unrecorded run's, bit for bit; the rows agree with the module path's (float32 with TF32 in the kernels)."""
    from djinn_kernel.api import Model
    from djinn_kernel.engine import Engine

    got = {}
    for fast in (True, False):
        engine = Engine(device="cuda", fast=fast)
        try:
            model = Model(engine, engine.register_model("tiny", tiny))
            with model.session() as s:
                plain = s.generate(PROMPT, 20).tokens
                s.record([1, 3])
                recorded = s.generate(PROMPT, 20)
                assert recorded.tokens == plain, "recording changes nothing"
                first = recorded.recorded  # read before the next run releases it
                s.break_at(3, tokens=5)
                s.break_at(2, tokens=9)
                run = s.generate(PROMPT, 20)
                while run.paused:
                    if run.pause.layer == 3:
                        run.pause.scale(0.5)
                    run.resume()
                got[fast] = first, run.tokens, run.recorded
        finally:
            engine.shutdown()
    (plain_rows, tokens, rows), (ref_plain, ref_tokens, ref_rows) = got[True], got[False]
    assert tokens == ref_tokens
    for key in (1, 3):
        assert plain_rows[key].shape == (len(PROMPT) + 19, 256)
        assert (plain_rows[key] - ref_plain[key]).abs().max() < 2e-2 and (rows[key] - ref_rows[key]).abs().max() < 2e-2


def test_packed_prefill_kernels_match_hugging_face(tiny):
    """Rows of any length, fresh or continuing a held context, in one packed prefill: the logits of each row's
    last token and the K/V left in its blocks (read back by a decode step) agree with HF's full forward."""
    from djinn_kernel.runner import DecodeRow, Runner

    def hf_last(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return tiny(torch.tensor([ids], device="cuda")).logits[0, -1].float()

    runner = Runner(tiny)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (1, 40, 64, 65, 150, 7)]
    kvs = [runner.new_kv() for _ in seqs]
    held = [0, 0, 0, 0, 100, 5]  # the last two rows continue a context held from an earlier prefill
    first = [(kv, seq[:n], {}) for kv, seq, n in zip(kvs, seqs, held) if n]
    runner.prefill(first)
    logits = runner.prefill([(kv, seq[n:], {}) for kv, seq, n in zip(kvs, seqs, held)])
    for row, seq in enumerate(seqs):
        assert (logits[row].float() - hf_last(seq)).abs().max() < 2e-3
    nxt = logits.argmax(-1).tolist()
    step = runner.decode([DecodeRow(kv, t) for kv, t in zip(kvs, nxt)])
    for row, (seq, t) in enumerate(zip(seqs, nxt)):
        assert (step[row].float() - hf_last([*seq, t])).abs().max() < 2e-3


def test_a_streamed_model_steps_batched_with_eager_streamed_layers_and_graphs_of_the_rest(tiny):
    """Three of four layers streamed through a 2-slot ring: eight rows per step agree with the resident runner, and
    each step copies every streamed layer once for all eight (tests/test_streaming_batched.py on the CPU)."""
    import copy

    from djinn_kernel.runner import DecodeRow, Runner, fuse_layers
    from djinn_kernel.streaming import packed_bytes, plan_for, stream_model

    model = copy.deepcopy(tiny)
    fuse_layers(model)
    layers = list(model.model.layers)
    in_layers = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    other = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) - in_layers
    plan = plan_for(model, layers, other + 3 * packed_bytes(layers[0]), 2)
    assert plan.streamed == (0, 1, 2) and plan.resident == (3,)
    ring = stream_model(model, [f"model.layers.{i}" for i in range(4)], plan, torch.device("cuda"))
    runner, reference = Runner(model, ring=ring), Runner(tiny)
    prompts = [PROMPT[i:] for i in range(8)]
    kvs, ref_kvs = [runner.new_kv() for _ in prompts], [reference.new_kv() for _ in prompts]
    logits = runner.prefill([(kv, p, {}) for kv, p in zip(kvs, prompts)])
    expected = reference.prefill([(kv, p, {}) for kv, p in zip(ref_kvs, prompts)])
    for _ in range(12):
        assert (logits.float() - expected.float()).abs().max() < 2e-3
        tokens = expected.argmax(-1).tolist()
        forwards = ring.forwards
        logits = runner.decode([DecodeRow(kv, t) for kv, t in zip(kvs, tokens)]).clone()
        expected = reference.decode([DecodeRow(kv, t) for kv, t in zip(ref_kvs, tokens)]).clone()
        assert ring.forwards == forwards + 1 and ring.per_forward[-1] == plan.arena_bytes
    assert any(key[3] == 3 for key in runner._graphs.graphs), "the resident layer replays a graph"
    assert all(slot.readers == 0 for slot in ring.slots)


@pytest.mark.parametrize("pages", [1, 2, 4])
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_decode_attention_over_block_groups_and_splits_matches_sdpa(pages, splits):
    """The decode attention kernel with any blocks per iteration and any split count, rows of lengths that end
    inside, at and past a group's last block (one group holds ``32 * pages`` tokens), grouped query heads."""
    from djinn_kernel import kernels
    from djinn_kernel.kv_blocks import BlockKV, KVShape

    heads, kv_heads, dim, layer = 8, 2, 64, 1
    shape = KVShape(3, kv_heads, dim, torch.float32, torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 31, 32, 33, 128, 129, 300, 700]
    kvs = []
    for n in lengths:
        kv = BlockKV(shape)
        kv.ensure(n)
        for block in kv.blocks:
            block.normal_(generator=gen)
        kv.length = n
        kvs.append(kv)
    ptrs = torch.zeros((len(kvs), 32), dtype=torch.long)
    for r, kv in enumerate(kvs):
        ptrs[r, : len(kv.blocks)] = torch.tensor(kv.pointers())
    q = torch.randn((len(kvs), heads, dim), device="cuda", generator=gen)
    lens = torch.tensor(lengths, device="cuda")
    got = kernels.attend(q, ptrs.cuda(), lens, layer, kv_heads, shape.block_tokens, splits, pages)
    for r, (kv, n) in enumerate(zip(kvs, lengths)):
        keys, values = (x.repeat_interleave(heads // kv_heads, dim=0) for x in kv.read(layer, n))
        expected = torch.nn.functional.scaled_dot_product_attention(q[r][:, None], keys, values)[:, 0]
        assert (got[r] - expected).abs().max() < 2e-3, f"row {r} ({n} tokens)"
