"""Chunked prefill (issue 13's admission control): a long prompt's activation memory, its time, and how long
the sessions decoding meanwhile wait, whole against chunked, in one process.

A seeded random Llama-2-7B-shape model in bf16 built on the GPU (context raised to 32k), served by one engine
with the fast path; the module path's runs are forced with a ``Scale(1.0)`` steering (the fast path hands any
``Scale`` to the module path; x1.0 changes no value).

1. Memory: for each path and prompt length, a fresh session prefills the prompt and generates one token; the
   device's peak allocation during the run less what is allocated once it returned (the session still holds
   its KV, blocks or cache; the activations are gone) is the prefill's activations. Against ``LoadedModel.prefill_bytes`` (what admission reserves): the estimate
   must cover the measurement. Whole (``prefill_chunk`` past the prompt) and chunked (2,048).
2. Decode stalls (fast path): session A decodes 512 tokens while session B's prompt arrives; the gaps between
   the forwards that give A a token show how long A waited behind B's prefill: one whole forward, or one chunk
   at a time. Those forwards are A's decode steps and the prefills A rides in (the scheduler gives a decoding
   run its token in a prompt's forward: a one-token row), each timed at the runner's entry; every forward
   ends in a host sync, so the gap between two entries is the first one's whole time.

    PYTHONPATH=.:experiments python3 experiments/bench_prefill.py --out results.json   # GPU
    PYTHONPATH=.:experiments python3 experiments/bench_prefill.py --small              # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from bench_paging import build_model, environment, log, sync
from djinn_kernel.api import Model
from djinn_kernel.edits import Scale
from djinn_kernel.engine import Engine

WHOLE = 1 << 30


def set_chunk(engine: Engine, loaded, chunk: int) -> None:
    engine.prefill_chunk = chunk
    loaded.scheduler.prefill_tokens = chunk


def memory_cell(model: Model, loaded, prompt: list[int], fast: bool, device: torch.device) -> dict[str, object]:
    s = model.session()
    if not fast:
        s.steer_with(0, Scale(1.0))
    sync(device)
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    start = time.perf_counter()
    run = s.generate(prompt, 1)
    sync(device)
    seconds = time.perf_counter() - start
    kv = sum(t.untyped_storage().nbytes() for t in engine_session(model, s).gpu_tensors())
    cuda = device.type == "cuda"
    measured = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device) if cuda else None
    chunk = model._backend.prefill_chunk
    piece = min(len(prompt), chunk)
    estimate = loaded.prefill_bytes(piece, len(prompt), fast)
    s.close()
    assert run.state == "finished"
    return {"prompt_tokens": len(prompt), "chunk": None if chunk >= len(prompt) else chunk, "seconds": seconds,
            "kv_bytes": kv, "activation_bytes_measured": measured, "activation_bytes_reserved": estimate,
            "reservation_covers": None if measured is None else estimate >= measured}


def engine_session(model: Model, session):
    return model._backend._session(session.id)


def stall_cell(model: Model, loaded, prompt: list[int], decode_tokens: int) -> dict[str, object]:
    runner = loaded.scheduler.runner
    stamps: list[float] = []
    decode, prefill = runner.decode, runner.prefill

    def timed_decode(rows):
        stamps.append(time.perf_counter())
        return decode(rows)

    def timed_prefill(rows, *args, **kwargs):
        if any(len(feed) == 1 for _, feed, _ in rows):  # A rides in B's prefill (or chunk): one of A's tokens
            stamps.append(time.perf_counter())
        return prefill(rows, *args, **kwargs)

    runner.decode, runner.prefill = timed_decode, timed_prefill
    a, b = model.session(), model.session()
    started = threading.Event()
    arrived: list[float] = []
    try:
        thread = threading.Thread(target=lambda: a.generate(prompt[:32], decode_tokens,
                                                            on_progress=lambda p: started.set()))
        thread.start()
        started.wait()
        time.sleep(0.2)  # A decodes alone for a while: its steady step time
        arrived.append(time.perf_counter())
        run = b.generate(prompt, 1)
        done = time.perf_counter()
        thread.join()
    finally:
        runner.decode, runner.prefill = decode, prefill
    a.close(), b.close()
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    alone = [g for g, t in zip(gaps, stamps[1:]) if t < arrived[0]]
    during = [g for g, t in zip(gaps, stamps[1:]) if arrived[0] <= t <= done + 0.05]
    return {"b_prompt_tokens": len(prompt), "b_first_token_s": done - arrived[0], "b_state": run.state,
            "a_step_ms_alone_median": 1e3 * statistics.median(alone) if alone else None,
            "a_longest_gap_ms_during_b_prefill": 1e3 * max(during) if during else None,
            "a_steps_during_b_prefill": len(during)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny fp32 model on the CPU (a smoke test)")
    ap.add_argument("--lengths", default=None, help="prompt lengths (default 2048,8192,16384; 64,256 with --small)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device("cpu" if args.small else "cuda")
    lengths = [int(n) for n in (args.lengths or ("64,256" if args.small else "2048,8192,16384")).split(",")]
    chunk = 32 if args.small and args.chunk == 2048 else args.chunk
    net, shape = build_model(args.small, device, args.seed, dtype=torch.float32 if args.small else torch.bfloat16,
                             max_positions=max(lengths) + 1024)
    vocab = shape["shape"]["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, vocab, (max(lengths),), generator=gen).tolist()
    engine = Engine(device=device, fast=True)
    model = Model(engine, engine.register_model("7b-shape", net))
    loaded = engine._model("7b-shape")
    result: dict[str, object] = {
        "benchmark": "bench_prefill (issue 13)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device),
        "model": shape, "fast_path": model.info["fast_path"], "chunk": chunk,
    }
    for size in (WHOLE, chunk):  # warm both paths, whole and chunked (compiles, the allocator's pools)
        set_chunk(engine, loaded, size)
        for fast in (True, False):
            memory_cell(model, loaded, prompt[: chunk + 64], fast, device)
    cells = []
    for fast in (True, False):
        for n in lengths:
            for size in (WHOLE, chunk):
                set_chunk(engine, loaded, size)
                cell = {"path": "fast" if fast else "module", **memory_cell(model, loaded, prompt[:n], fast, device)}
                cells.append(cell)
                log(json.dumps(cell))
    stalls = []
    for size in (WHOLE, chunk):
        set_chunk(engine, loaded, size)
        cell = {"chunk": None if size == WHOLE else size, **stall_cell(model, loaded, prompt, 64 if args.small else 512)}
        stalls.append(cell)
        log(json.dumps(cell))
    result.update(memory=cells, stalls=stalls)
    engine.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
