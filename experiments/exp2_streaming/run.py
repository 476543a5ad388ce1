"""Experiment 2: a model larger than the GPU budget, decoded by streaming its decoder layers over PCIe.

One process, in this order (each phase logs with a timestamp and rewrites ``--out``, so a run cut short still
leaves what it measured; ``complete`` is true only at the end):

1. pinned H2D bandwidth: one 1 GiB copy pinned host -> device, median of reps (the floor's denominator);
2. Hugging Face Accelerate: the Llama-2-13B shape (fp16, random weights made on the GPU, then moved to host
   memory), ``infer_auto_device_map`` + ``dispatch_model`` with ``max_memory`` {0: budget, "cpu": ...}; prefill
   of the prompt and a few decode tokens (~1.75 s each), timed with a synchronize;
3. Djinn: the same shape and seed made on the GPU again and registered with ``Engine(weight_memory=budget)``:
   the layers that do not fit move to the pinned arena and stream through the ring. Prefill (a run of one
   token) and decode per token ((run of 1 + n tokens - run of 1) / n), bytes streamed per token from the
   ring's count, achieved H2D rate, the floor (streamed bytes / pinned H2D) and its ratio;
4. one paused session on the streamed model: a breakpoint at a streamed layer, the activation read, the logit
   lens, the session paged out and in, resumed; tokens and logits against an unpaused run;
5. batched decode of the streamed model: the same shape and seed under a fast engine (``fast=True``: the
   runner acquires each streamed layer from the ring once per step for every session in it), aggregate
   tokens/s of 1 and of 8 sessions decoding at once (each on its own thread, as bench_decode.py's
   ``aggregate``), bytes streamed per step, and a step's time against the floor (streamed bytes / pinned H2D):
   the batch reads the streamed weights once, so 8 sessions should come close to 8x the tokens/s of one;
6. exactness: a smaller model (TinyLlama-1.1B shape) that fits both ways, resident vs streamed (half its
   layers), tokens equal and logits ``torch.equal``.

Engines here are ``deterministic`` (math attention), except phase 5's: runs repeat bit for bit, and at batch 1
decode of a streamed model is bound by PCIe, not attention. Accelerate runs first, with the default attention kernels.

    PYTHONPATH=$PWD:$PWD/experiments python3 experiments/exp2_streaming/run.py --out $OUT/exp2_h200.json
    PYTHONPATH=$PWD:$PWD/experiments python3 experiments/exp2_streaming/run.py --small --out /tmp/exp2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

import djinn_kernel as dj
from bench_decode import aggregate
from bench_paging import LLAMA_SHAPES, START, copy_bandwidth, log, nvidia_smi, sync
from djinn_kernel.decode import ForwardCall
from djinn_kernel.engine import Engine
from djinn_kernel.memory import GiB, MiB, LRUPolicy, MemoryManager
from djinn_kernel.streaming import packed_bytes

GB = 1e9
SHAPES = {
    "llama2-13b": LLAMA_SHAPES["13b"],
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "small-big": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256),
    "small-exact": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256),
}


def llama(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A seeded random Llama of a named shape, created directly on ``device`` (13B on the CPU takes 460 s)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"rms_norm_eps": 1e-5, **SHAPES[shape]}, max_position_embeddings=4096, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def budget_for(model, keep_layers: int, slots: int = 2) -> int:
    """Weight bytes that keep ``keep_layers`` decoder layers resident plus ``slots`` ring slots."""
    layers = model.model.layers
    in_layers = sum(p.numel() * p.element_size() for p in layers.parameters())
    other = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) - in_layers
    return other + (keep_layers + slots) * packed_bytes(layers[0])


def engine(device: torch.device, weight_memory: int | None, fast: bool = False) -> Engine:
    """A deterministic engine (or one on the batched fast path) with a small pinned host pool (the session pages
    a few MB here)."""
    memory = MemoryManager(device, 1 << 40, 4 * GiB, LRUPolicy(), chunk_bytes=256 * MiB,
                           host_reserve=256 * MiB if device.type == "cuda" else 0)
    return Engine(device=device, memory=memory, deterministic=not fast, fast=fast, weight_memory=weight_memory)


# phases ---------------------------------------------------------------------------------------------------
def bandwidth(device: torch.device, nbytes: int, reps: int) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda").random_(0, 256)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = copy_bandwidth(host, dev, reps)
    del host, dev
    free(device)
    return rates


def accelerate_baseline(args, device: torch.device, dtype: torch.dtype, prompt: list[int]) -> dict:
    """Accelerate's CPU offload with the same budget: per-token decode and prefill, a few tokens."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError as exc:
        return {"skipped": f"accelerate is not installed ({exc})"}
    model = llama(args.shape, device, dtype, args.seed)
    t = time.perf_counter()
    model = model.to("cpu")
    free(device)
    log(f"accelerate: model moved to host memory in {time.perf_counter() - t:.1f} s")
    gpu = 0 if device.type == "cuda" else "cpu"
    max_memory = {gpu: args.budget, "cpu": args.host_memory} if device.type == "cuda" else {"cpu": args.host_memory}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"])
    model = dispatch_model(model, device_map=device_map)
    placed = [str(v) for k, v in device_map.items() if ".layers." in f"{k}." or k.endswith(".layers")]
    log(f"accelerate: device map {dict((str(v), placed.count(str(v))) for v in set(placed))} (decoder-layer entries)")
    call = ForwardCall.of(model)
    ids = torch.tensor([prompt], device=device)

    def forward(tokens: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=tokens, **call.kwargs(cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return token, time.perf_counter() - start

    from transformers import DynamicCache

    forward(ids[:, :8], DynamicCache())  # warm-up
    cache = DynamicCache()
    token, prefill_s = forward(ids, cache)
    log(f"accelerate: prefill of {len(prompt)} tokens {prefill_s:.2f} s")
    decode, tokens = [], [int(token)]
    for _ in range(args.accelerate_tokens):
        token, seconds = forward(token, cache)
        decode.append(seconds)
        tokens.append(int(token))
        log(f"accelerate: decode token {len(decode)} {seconds:.3f} s")
    remove_hook_from_submodules(model)
    del model, cache
    free(device)
    return {
        "device_map_layers": {v: placed.count(v) for v in set(placed)},
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "prefill_s": prefill_s,
        "decode_s_per_token": statistics.median(decode),
        "decode_s_each": decode,
        "tokens": tokens,
    }


class TimedCopies:
    """The ring's CUDA ops with each copy bracketed by timing events (after its waits): how long the copy engine
    was busy, apart from the gaps between copies. Used for one diagnostic run, not the timed rounds."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    def record(self):
        return self.ops.record()

    def wait(self, event) -> None:
        self.ops.wait(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list):
        stream = self.ops.stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for event in after:
            stream.wait_event(event)
        start.record(stream)
        ready = self.ops.copy(dst, src, [])
        end.record(stream)
        self.spans.append((start, end, dst.numel()))
        return ready

    def summary(self, wall_s: float) -> dict:
        torch.cuda.synchronize()
        seconds = sum(a.elapsed_time(b) for a, b, _ in self.spans) / 1e3
        nbytes = sum(n for *_, n in self.spans)
        return {"copies": len(self.spans), "bytes": nbytes, "copy_s": seconds, "wall_s": wall_s,
                "copy_gbps": nbytes / seconds / GB if seconds else None,
                "copy_engine_busy_fraction": seconds / wall_s if wall_s else None}


def copy_timing(session, ring, prompt: list[int], n: int, device: torch.device) -> dict:
    """One more run of 1 + n tokens with every ring copy timed on the prefetch stream."""
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    timed = TimedCopies(ring.ops)
    ring.ops = timed
    try:
        wall, _ = timed_run(session, prompt, 1 + n, device)
    finally:
        ring.ops = timed.ops
    return timed.summary(wall)


def timed_run(session, prompt: list[int], n: int, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    run = session.generate(prompt, n, keep_logits=True)
    sync(device)
    return time.perf_counter() - start, run


def djinn_streaming(args, device: torch.device, dtype: torch.dtype, prompt: list[int], h2d: float,
                    result: dict, save) -> None:
    """Djinn with the same budget: prefill, decode per token, bytes, floor; then one paused session."""
    model = llama(args.shape, device, dtype, args.seed)
    eng = engine(device, args.budget_bytes)
    t = time.perf_counter()
    handle = dj.Model(eng, eng.register_model(args.shape, model))
    del model
    free(device)
    ring = eng._model(args.shape).ring
    stats = handle.info["streaming"]
    load = {
        "register_s": time.perf_counter() - t,
        "resident_layers": len(stats["resident_layers"]),
        "streamed_layers": len(stats["streamed_layers"]),
        "ring_slots": stats["ring_slots"],
        "slot_bytes": stats["slot_bytes"],
        "arena_bytes": stats["arena_bytes"],
        "device_weight_bytes": stats["device_bytes"],
        "arena_pinned": stats["arena_pinned"],
        "memory_allocated_after_load": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
    }
    result["djinn_load"] = load
    log(f"djinn: registered in {load['register_s']:.1f} s: {load['resident_layers']} layers resident, "
        f"{load['streamed_layers']} streamed through {load['ring_slots']} slots; device weights "
        f"{load['device_weight_bytes'] / GiB:.2f} GiB")
    save()
    n = args.djinn_tokens
    with handle.session() as s:
        timed_run(s, prompt[:8], 2, device)  # warm-up
        prefill, decode = [], []
        for round_ in range(args.rounds):
            one, _ = timed_run(s, prompt, 1, device)
            many, run = timed_run(s, prompt, 1 + n, device)
            prefill.append(one)
            decode.append((many - one) / n)
            log(f"djinn: round {round_ + 1}: prefill {one:.3f} s, decode {decode[-1]:.4f} s/token")
        reference = (run.tokens, run.logits)
        result["djinn_copy_timing"] = guarded("copy timing", copy_timing, s, ring, prompt, n, device)
    per_token = ring.stats()["bytes_per_token"]
    d = statistics.median(decode)
    floor = per_token / (h2d * GB)
    result.update(
        djinn_prefill_s=statistics.median(prefill),
        djinn_prefill_s_per_prompt_token=statistics.median(prefill) / len(prompt),
        djinn_decode_s_per_token=d,
        djinn_decode_s_each_round=decode,
        djinn_bytes_streamed_per_token=per_token,
        streamed_bytes=stats["arena_bytes"],
        djinn_achieved_h2d_gbps=per_token / d / GB,
        floor_s_per_token=floor,
        floor_ratio=d / floor,
        djinn_tokens=reference[0],
    )
    log(f"djinn: decode {d:.4f} s/token, {per_token / GB:.2f} GB/token, {per_token / d / GB:.1f} GB/s, "
        f"floor {floor:.4f} s -> ratio {d / floor:.3f}")
    save()
    result["paused_session"] = guarded("paused session", paused_session, handle, prompt, reference, n,
                                       stats["streamed_layers"])
    save()
    eng.shutdown()
    del handle, ring
    free(device)


def paused_session(handle: dj.Model, prompt: list[int], reference, n: int, streamed: list[int]) -> dict:
    """Pause at a streamed layer, read, lens, page out and in, resume: the run must equal the unpaused one."""
    layer = streamed[len(streamed) // 2]
    with handle.session() as s:
        s.break_at(layer, tokens=2)
        run = s.generate(prompt, 1 + n, keep_logits=True)
        paused = run.paused and run.pause.layer == layer
        activation = run.pause.activation if paused else None
        lens = run.pause.logit_lens(k=1) if paused else []
        out = s.page_out()
        back = s.page_in()
        run.resume()
        finished = run.state
        exact = run.tokens == reference[0] and torch.equal(run.logits, reference[1])
    log(f"djinn: paused at streamed layer {layer}: paused={paused}, paged {out['bytes']} B, exact={exact}")
    return {
        "layer": layer,
        "paused": paused,
        "activation_norm": None if activation is None else float(activation.float().norm()),
        "lens_top1": lens[0]["token_id"] if lens else None,
        "paged_out_bytes": out["bytes"],
        "paged_in_bytes": back["gpu_bytes"],
        "state_after_resume": finished,
        "exact": bool(paused and exact),
    }


def batched_decode(args, device: torch.device, dtype: torch.dtype, prompt: list[int], h2d: float) -> dict:
    """1 and 8 sessions decoding at once on the streamed model under a fast engine: tokens/s, bytes per step,
    a step's time against the floor."""
    model = llama(args.shape, device, dtype, args.seed)
    eng = engine(device, args.budget_bytes, fast=True)
    try:
        t = time.perf_counter()
        handle = dj.Model(eng, eng.register_model(args.shape, model))
        del model
        free(device)
        out: dict[str, object] = {"register_s": time.perf_counter() - t, "fast_path": handle.info["fast_path"]}
        log(f"batched: registered in {out['register_s']:.1f} s, fast path {out['fast_path']}")
        if out["fast_path"] == "on":
            out.update(batched_rates(args, handle, eng._model(args.shape), device, prompt, h2d))
        return out
    finally:
        eng.shutdown()


def batched_rates(args, handle: dj.Model, loaded, device: torch.device, prompt: list[int], h2d: float) -> dict:
    """The figures of ``batched_decode``; a step's time is the scheduler's (prefill apart), its bytes the ring's."""
    ring, scheduler = loaded.ring, loaded.scheduler

    def counters() -> dict[str, float]:
        sync(device)
        return {**scheduler.stats(), "rows": scheduler.batched_rows, "ring_forwards": ring.forwards,
                "ring_bytes": ring.bytes_copied}

    streamed = ring.plan.arena_bytes
    floor = streamed / (h2d * GB)
    n = args.batched_tokens
    prompts = [prompt[i:] + prompt[:i] for i in range(8)]  # eight different prompts of the same length
    out: dict[str, object] = {"streamed_bytes": streamed, "floor_s_per_step": floor}
    for sessions in (1, 8):
        rate, _, moved = aggregate(handle, prompts[:sessions], n, counters)
        steps = max(moved["decode_steps"], 1)
        step_s = moved["decode_seconds"] / steps
        out[f"sessions_{sessions}"] = {
            "tokens_per_s": rate,
            "decode_steps": moved["decode_steps"],
            "rows_per_step": moved["rows"] / steps,
            "step_s": step_s,
            "bytes_per_step": ring.per_forward[-1],
            "ring_bytes_per_forward": moved["ring_bytes"] / max(moved["ring_forwards"], 1),
            "step_over_floor": step_s / floor,
        }
        log(f"batched: {sessions} session(s): {rate:.2f} tokens/s, {step_s:.4f} s/step "
            f"({step_s / floor:.3f}x the floor), {ring.per_forward[-1] / GB:.2f} GB/step")
    out["speedup_8_vs_1"] = out["sessions_8"]["tokens_per_s"] / out["sessions_1"]["tokens_per_s"]
    out["bytes_per_step_equal_streamed_bytes"] = out["sessions_8"]["bytes_per_step"] == streamed
    return out


def guarded(what: str, phase, *args) -> dict:
    """Run a phase whose failure must not cost the others their figures: its error goes into the JSON."""
    try:
        return phase(*args)
    except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on to the next phase
        log(f"{what} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def exactness(args, device: torch.device, dtype: torch.dtype, prompt: list[int]) -> dict:
    """A model that fits both ways: resident under one engine, then streamed (half its layers) under another."""
    model = llama(args.exact_shape, device, dtype, args.seed + 1)
    budget = budget_for(model, model.config.num_hidden_layers // 2)
    runs = []
    for weight_memory in (None, budget):
        eng = engine(device, weight_memory)
        handle = dj.Model(eng, eng.register_model(args.exact_shape, model))
        with handle.session() as s:
            run = s.generate(prompt, args.djinn_tokens, keep_logits=True)
            runs.append((run.tokens, run.logits, handle.info["streaming"]))
        eng.shutdown()
    (tokens, logits, _), (s_tokens, s_logits, stats) = runs
    del model
    free(device)
    out = {
        "shape": args.exact_shape,
        "streamed_layers": len(stats["streamed_layers"]),
        "resident_layers": len(stats["resident_layers"]),
        "tokens_equal": tokens == s_tokens,
        "logits_bitwise": bool(torch.equal(logits, s_logits)),
        "tokens": tokens,
    }
    log(f"exactness on {args.exact_shape}: {out}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="write the result JSON here (rewritten after every phase)")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a smoke test in seconds")
    ap.add_argument("--budget", default="16GiB", help="GPU weight budget for Accelerate and Djinn (default 16GiB)")
    ap.add_argument("--host-memory", default="200GiB", help="Accelerate's max_memory['cpu']")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--accelerate-tokens", type=int, default=3, help="decode tokens timed for Accelerate")
    ap.add_argument("--djinn-tokens", type=int, default=8, help="decode tokens per timed Djinn run")
    ap.add_argument("--rounds", type=int, default=3, help="timed Djinn rounds (prefill run + decode run)")
    ap.add_argument("--batched-tokens", type=int, default=16, help="tokens per session in the batched phase")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.small and not torch.cuda.is_available():
        log("CUDA is not available: run on the GPU machine, or pass --small for a CPU smoke test")
        return 2
    device = torch.device("cpu" if args.small else "cuda")
    dtype = torch.float32 if args.small else torch.float16
    args.shape, args.exact_shape = ("small-big", "small-exact") if args.small else ("llama2-13b", "tinyllama-1.1b")
    if args.small:
        probe = llama(args.shape, torch.device("meta"), dtype, args.seed)
        args.budget_bytes = budget_for(probe, SHAPES[args.shape]["num_hidden_layers"] // 2)
        args.budget = args.budget_bytes
        del probe
    else:
        from djinn_kernel.memory import parse_bytes

        args.budget_bytes = parse_bytes(args.budget)
    prompt = [(7 * i + 3) % (SHAPES[args.shape]["vocab_size"] - 3) + 3 for i in range(args.prompt_tokens)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    import transformers

    result: dict[str, object] = {
        "experiment": "exp2 weight streaming (experiments/exp2_streaming/run.py)",
        "mode": "small" if args.small else "full",
        "complete": False,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "nvidia_smi": nvidia_smi() if device.type == "cuda" else None,
        },
        "shape": {"name": args.shape, **SHAPES[args.shape], "dtype": str(dtype).removeprefix("torch.")},
        "budget_bytes": args.budget_bytes,
        "prompt_tokens": len(prompt),
    }

    def save() -> None:
        result["elapsed_s"] = time.monotonic() - START
        out.write_text(json.dumps(result, indent=2, default=str))

    try:
        log(f"device {result['environment']['device']}, torch {torch.__version__}, budget {args.budget_bytes} B")
        rates = bandwidth(device, 16 * MiB if args.small else GiB, 10)
        h2d = max(rates["h2d"]["median"], 1e-9)
        result["pinned_bandwidth_gbps"] = rates
        result["pinned_h2d_gbps"] = h2d
        log(f"pinned H2D {h2d:.2f} GB/s, D2H {rates['d2h']['median']:.2f} GB/s")
        save()
        result["accelerate"] = guarded("accelerate", accelerate_baseline, args, device, dtype, prompt)
        free(device)
        save()
        djinn_streaming(args, device, dtype, prompt, h2d, result, save)
        accelerate = result["accelerate"]
        if "decode_s_per_token" in accelerate:
            result["accelerate_decode_s_per_token"] = accelerate["decode_s_per_token"]
            result["accelerate_prefill_s"] = accelerate["prefill_s"]
            result["speedup_vs_accelerate"] = accelerate["decode_s_per_token"] / result["djinn_decode_s_per_token"]
            result["prefill_speedup_vs_accelerate"] = accelerate["prefill_s"] / result["djinn_prefill_s"]
        save()
        result["batched_8_sessions"] = guarded("batched decode", batched_decode, args, device, dtype, prompt, h2d)
        free(device)
        save()
        result["exact_vs_resident"] = guarded("exactness", exactness, args, device, dtype, prompt[:32])
        result["targets"] = {
            "floor_ratio <= 1.15": result["floor_ratio"] <= 1.15,
            "speedup_vs_accelerate >= 8": result.get("speedup_vs_accelerate", 0) >= 8,
            "exact_vs_resident": bool(result["exact_vs_resident"].get("logits_bitwise")),
            "paused_session_exact": bool(result["paused_session"].get("exact")),
            "batched 8 sessions >= 6x the tokens/s of 1": result["batched_8_sessions"].get("speedup_8_vs_1", 0) >= 6,
        }
        result["complete"] = True
        save()
        log(f"done: {json.dumps(result['targets'])}")
        return 0
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        save()
        log(f"failed: {result['error']}")
        raise


if __name__ == "__main__":
    raise SystemExit(main())
