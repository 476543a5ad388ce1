"""The decode attention kernel alone (kernels.attend) on long contexts: how fast it reads the KV cache against
the HBM bandwidth, by batch rows, context length and split count, to choose ``split_count``; then the prefill
attention kernel (kernels.attend_prompt) on three packed prompts, by blocks per iteration (``prompt_cells``:
microseconds per layer and TFLOP/s of its causal attention, 4 x head_dim x heads multiply-adds per query and key
it sees; compute-bound, so no bandwidth floor).

Llama-2-7B attention shape (32 query and KV heads, head dim 128, bf16, 32-token blocks). Each cell captures 20
calls of one layer's attention in a CUDA graph (as a decode step runs it) and replays it; the bytes are the K
and V the rows hold (rows x context x 2 x 32 x 128 x 2 B), the floor those bytes over the copy bandwidth
measured in the same run.

    PYTHONPATH=. python3 experiments/bench_attention.py --out results.json   # GPU only
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from djinn_kernel import kernels
from djinn_kernel.kv_blocks import BlockKV, KVShape
from djinn_kernel.runner import PROMPT_TILE

HEADS, HEAD_DIM, LAYERS, LAYER = 32, 128, 4, 2
CALLS = 20


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB (read + write), bytes per second: the yardstick of the floors."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * a.numel() * 10 / (time.perf_counter() - start)


def graphed(run, device: torch.device) -> float:
    """Seconds per call of ``run``: ``CALLS`` calls captured in a CUDA graph (as a step runs them), replayed; the
    median of 5 replays after a warm one."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            run()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / CALLS)
    return sorted(times)[len(times) // 2]


def random_rows(lengths: list[int], device: torch.device) -> tuple[list[BlockKV], torch.Tensor]:
    """Rows of random K/V of these lengths and their block table (keep the rows alive while it is used)."""
    shape = KVShape(LAYERS, HEADS, HEAD_DIM, torch.bfloat16, device)
    kvs = []
    for length in lengths:
        kv = BlockKV(shape)
        kv.ensure(length)
        for block in kv.blocks:
            block.normal_()
        kv.length = length
        kvs.append(kv)
    ptrs = torch.zeros((len(kvs), max(len(kv.blocks) for kv in kvs)), dtype=torch.long)
    for r, kv in enumerate(kvs):
        ptrs[r, : len(kv.blocks)] = torch.tensor(kv.pointers())
    return kvs, ptrs.to(device)


def cell(rows: int, context: int, splits: int, pages: int, device: torch.device) -> dict[str, float]:
    kvs, ptrs = random_rows([context] * rows, device)
    block = kvs[0].shape.block_tokens
    lens = torch.full((rows,), context, dtype=torch.long, device=device)
    q = torch.randn((rows, HEADS, HEAD_DIM), dtype=torch.bfloat16, device=device)
    seconds = graphed(lambda: kernels.attend(q, ptrs, lens, LAYER, HEADS, block, splits, pages), device)
    nbytes = rows * context * 2 * HEADS * HEAD_DIM * 2
    return {"rows": rows, "context": context, "splits": splits, "pages": pages, "us": seconds * 1e6, "bytes": nbytes,
            "gb_s": nbytes / seconds / 1e9}


PROMPTS = {  # name: the rows' (tokens held before, new tokens), packed into one prefill
    "one 2,048-token prompt": [(0, 2048)],
    "four rows of 512 new tokens after 1,000-1,700 held": [(1536, 512), (1400, 512), (1700, 512), (1000, 512)],
    "eight 256-token prompts": [(0, 256)] * 8,
}


def prompt_cell(name: str, rows: list[tuple[int, int]], pages: int, device: torch.device) -> dict[str, object]:
    kvs, ptrs = random_rows([start + count for start, count in rows], device)
    starts, counts = [s for s, _ in rows], [c for _, c in rows]
    tiles = torch.tensor(kernels.prompt_tiles(starts, counts, PROMPT_TILE), device=device)
    q = torch.randn((1, HEADS, sum(counts), HEAD_DIM), dtype=torch.bfloat16, device=device)
    block = kvs[0].shape.block_tokens
    seconds = graphed(lambda: kernels.attend_prompt(q, ptrs, tiles, LAYER, HEADS, block, PROMPT_TILE, pages), device)
    flops = sum(4 * HEAD_DIM * HEADS * (count * start + count * (count + 1) // 2) for start, count in rows)
    return {"prompt": name, "rows": rows, "pages": pages, "us": seconds * 1e6, "tflop_s": flops / seconds / 1e12}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--splits", default="1,2,4,8,16")
    parser.add_argument("--pages", default="1,2,4")
    parser.add_argument("--prompt-pages", default="1,2,4", help="blocks per iteration of the prefill cells")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    cells = []
    for context in map(int, args.contexts.split(",")):
        for rows in map(int, args.rows.split(",")):
            for splits, pages in itertools.product(map(int, args.splits.split(",")), map(int, args.pages.split(","))):
                c = cell(rows, context, splits, pages, device)
                c["floor_us"] = c["bytes"] / bandwidth * 1e6
                c["x_floor"] = c["us"] / c["floor_us"]
                c["split_count_default"] = kernels.split_count(rows * HEADS)
                cells.append(c)
                print(f"rows {rows:>2} context {context:>5} splits {splits:>2} pages {pages}: {c['us']:7.1f} us "
                      f"{c['gb_s']:6.0f} GB/s {c['x_floor']:.2f}x floor", flush=True)
                torch.cuda.empty_cache()
    prompt_cells = []
    for (name, rows), pages in itertools.product(PROMPTS.items(), map(int, args.prompt_pages.split(","))):
        c = prompt_cell(name, rows, pages, device)
        prompt_cells.append(c)
        print(f"prefill {name}, pages {pages}: {c['us']:7.1f} us {c['tflop_s']:6.1f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "copy_bandwidth_gb_s": bandwidth / 1e9,
              "shape": {"heads": HEADS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                        "block_tokens": 32}, "calls_per_graph": CALLS, "cells": cells,
              "prompt_tile": PROMPT_TILE, "prompt_cells": prompt_cells}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
