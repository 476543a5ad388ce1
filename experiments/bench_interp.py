"""Interpretability cost benchmark (issue 12): what a condition that never fires and a recording cost per token.

One process, one model: a seeded random Llama-2-7B-shape model in bf16 built on the GPU, served by a fast-path
``Engine`` (the batched layer loop with CUDA graphs), a 128-token random prompt, greedy decode. Per-token figures
are ``(t(n) - t(1)) / (n - 1)`` with ``t`` the wall time of a whole generation (bench_decode.per_token), so
prefill and per-call overheads cancel. In this order:

1. plain decode, no breakpoint;
2. a conditional breakpoint at layer 20 on every token step whose condition never holds, one per kind
   (``norm > 1e9``, ``dim[0] > 1e9``, ``token == #id`` for an id the run never feeds, ``lens_top1 == #id`` for an
   id the lens never ranks first here); a hit is resumed and counted (``hits`` must be 0 for the figure to mean
   "nothing fired");
3. recording layer 20, and every decoder layer, for the whole run (prefill rows and one per generated token),
   with the bytes recorded per token;
4. an activation-patching sweep of 8 layers x 8 prompt positions (64 one-token runs of a corrupted prompt, the
   clean prompt with 8 tokens changed), timed two ways on the same inputs: ``patch_sweep`` (each run steered
   with ``SetPromptRows``, ``--concurrent`` sessions at once, so the scheduler packs their prefills), and the
   sequential sweep it replaced (one run at a time, paused at the layer at the prefill and patched there with
   ``Pause.patch``, which takes the run out of the batch). Wall time of the whole sweep (clean and corrupted
   runs included), medians over ``--reps`` after one warm-up of each, and the largest difference between the
   two grids (packed prefills round differently from a lone one, so not 0 on the fast path).

Items 1-3 are reported in ms/token and as a ratio to plain decode measured in the same process, item 4 in
seconds and as the sequential sweep's time over the batched one's. None is asserted.

    PYTHONUNBUFFERED=1 PYTHONPATH=.:experiments python3 experiments/bench_interp.py --out $OUT/interp_h200.json
    PYTHONPATH=.:experiments python3 experiments/bench_interp.py --small --out /tmp/interp.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_decode import per_token
from bench_paging import build_model, environment, log
from djinn_kernel.api import Model
from djinn_kernel.engine import Engine
from djinn_kernel.patching import logit_difference, patch_sweep


def generate(session, prompt: list[int], k: int, hits: list[int]) -> None:
    """One generation of ``k`` tokens, resuming every pause (a condition that fired) and counting it."""
    run = session.generate(prompt, k)
    while run.paused:
        hits[0] += 1
        run.resume()


def timed(session, prompt: list[int], new: int, reps: int) -> tuple[float, int]:
    hits = [0]
    ms = per_token(lambda k: generate(session, prompt, k, hits), new, reps) * 1e3
    return ms, hits[0]


def paused_sweep(model: Model, clean: list[int], corrupted: list[int], metric, layers: list[int],
                 positions: list[int]) -> torch.Tensor:
    """The sequential sweep ``patch_sweep`` replaced: each patched run alone, paused at the prefill and patched."""
    grid = torch.empty(len(layers), len(positions))
    with model.session() as source, model.session() as target:
        source.record(layers)
        reference = source.generate(clean, 1, keep_logits=True)
        reference.recorded  # noqa: B018 - read while it is the source session's run
        target.generate(corrupted, 1, keep_logits=True)  # the unpatched run patch_sweep scores too
        for i, layer in enumerate(layers):
            bp = target.break_at(layer, tokens=0)
            for j, position in enumerate(positions):
                run = target.generate(corrupted, 1, keep_logits=True)
                grid[i, j] = metric(run.pause.patch(reference, [position]).finish().logits[0])
            target.delete(bp)
    return grid


def sweep(model: Model, prompt: list[int], vocab: int, layers: int, reps: int, concurrent: int) -> dict[str, object]:
    """Item 4 of the module docstring: the batched and the sequential sweep on the same inputs."""
    layer_ids = list(range(0, layers, max(1, layers // 8)))[:8]
    positions = list(range(len(prompt) - 1, -1, -max(1, len(prompt) // 8)))[:8][::-1]
    corrupted = list(prompt)
    for p in positions:
        corrupted[p] = (prompt[p] + 1) % vocab
    metric = logit_difference(3, 4)
    ways = {
        "batched": lambda: patch_sweep(model, prompt, corrupted, metric, layer_ids, positions,
                                       concurrent=concurrent).values,
        "sequential": lambda: paused_sweep(model, prompt, corrupted, metric, layer_ids, positions),
    }
    grids, seconds = {}, {}
    for name, way in ways.items():
        grids[name] = way()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            way()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
        log(f"sweep {len(layer_ids)} x {len(positions)} {name}: {seconds[name]:.3f} s")
    return {"layers": layer_ids, "positions": positions, "runs": len(layer_ids) * len(positions),
            "concurrent": concurrent, "seconds": seconds,
            "sequential_over_batched": seconds["sequential"] / seconds["batched"],
            "max_grid_difference": float((grids["batched"] - grids["sequential"]).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny fp32 model on the CPU (a smoke test)")
    ap.add_argument("--new", type=int, default=None, help="tokens per timed generation (default 64; 8 with --small)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrent", type=int, default=16, help="sessions the batched sweep runs at once")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small else "cuda")
    new = args.new or (8 if args.small else 64)
    layer = 2 if args.small else 20
    started = time.perf_counter()
    net, shape = build_model(args.small, device, args.seed, dtype=torch.float32 if args.small else torch.bfloat16)
    vocab = shape["shape"]["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, vocab, (16 if args.small else 128,), generator=gen).tolist()
    engine = Engine(device=device, fast=True)
    model = Model(engine, engine.register_model("7b-shape", net))
    result: dict[str, object] = {
        "benchmark": "bench_interp (issue 12)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device),
        "model": shape, "fast_path": model.info["fast_path"], "prompt_tokens": len(prompt), "new_tokens": new,
        "layer": layer,
    }
    s = model.session()
    generate(s, prompt, 4, [0])
    plain, _ = timed(s, prompt, new, args.reps)
    fed = set(prompt) | set(s.generate(prompt, new).tokens)
    unused = next(i for i in range(3, vocab) if i not in fed)
    lens_free = unused  # the lens's top-1 differs from the ids fed on random weights; hits say if it did not
    log(f"plain {plain:.2f} ms/token")
    conditions = {}
    for when in ("norm > 1e9", "dim[0] > 1e9", f"token == #{unused}", f"lens_top1 == #{lens_free}"):
        bp = s.break_at(layer, when=when)
        ms, hits = timed(s, prompt, new, args.reps)
        s.delete(bp)
        conditions[when] = {"ms_per_token": ms, "over_plain": ms / plain, "hits": hits}
        log(f"when {when!r}: {ms:.2f} ms/token ({ms / plain:.3f} x plain), {hits} hits")
    recording = {}
    hidden = shape["shape"]["hidden_size"]
    itemsize = torch.empty((), dtype=net.dtype).element_size()
    for name, targets in ((f"layer {layer}", [layer]), ("every layer", list(range(shape["shape"]["num_hidden_layers"])))):
        s.record(targets)
        ms, _ = timed(s, prompt, new, args.reps)
        s.unrecord()
        recording[name] = {"targets": len(targets), "ms_per_token": ms, "over_plain": ms / plain,
                           "bytes_recorded_per_token": len(targets) * hidden * itemsize}
        log(f"record {name}: {ms:.2f} ms/token ({ms / plain:.3f} x plain)")
    s.close()
    patching = sweep(model, prompt, vocab, shape["shape"]["num_hidden_layers"], args.reps, args.concurrent)
    result.update(plain_ms_per_token=plain, conditions=conditions, recording=recording, patch_sweep=patching,
                  elapsed_s=time.perf_counter() - started)
    engine.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    log(json.dumps({k: result[k] for k in ("plain_ms_per_token", "conditions", "recording", "patch_sweep")}))


if __name__ == "__main__":
    main()
