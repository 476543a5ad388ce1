"""Experiment 3 (issue 8): many sessions paused mid-forward at once, far more KV than the GPU holds.

One process, one model: a seeded random Llama-2-13B-shape model in fp16 made on the GPU (``--checkpoint`` for a
real local one). In this order:

1. bandwidths of the tiers, measured here: pinned host <-> device copies, and the disk tier's own write and read
   of a file in the spill folder (its threads and block size, from and into pinned memory as it pages), the read
   once the file was dropped from the OS page cache;
2. the baseline a user would write by hand: plain PyTorch eager, a forward hook that blocks at layer ``--layer``
   of the first decode step, every paused session keeping its KV on the GPU: how many fit before the device runs
   out of memory;
3. Djinn (deterministic mode, so every run repeats bit for bit): ``--sessions`` sessions with a
   ``--prompt-tokens`` context each, all paused at that layer of token step 1 at the same time, the memory
   manager paging the least recently used to the host pool and, when that is full, to the disk tier;
4. steering at scale: every second session scales its paused activation by 0.9;
5. every session resumed (its page-in timed by tier, the spill files first dropped from the OS page cache so the
   disk tier reads the disk, as the bandwidth was measured) and finished; tokens and logits compared bit for bit
   with the same session's unpaged reference run (made after, on the same engine);
6. concurrency: a session paused and paged out while another runs a whole generation, then resumed.

The result JSON (``--out``) is rewritten after every phase, so a run cut short keeps what it measured.

    PYTHONUNBUFFERED=1 PYTHONPATH=.:experiments python3 experiments/exp3_whitebox/run.py --out $OUT/exp3_h200.json
    PYTHONPATH=.:experiments python3 experiments/exp3_whitebox/run.py --small --out /tmp/exp3_small.json   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_paging import build_model, copy_bandwidth, log, nvidia_smi, percentiles, sync
from djinn_kernel.api import Model
from djinn_kernel.decode import ForwardCall
from djinn_kernel.engine import Engine
from djinn_kernel.memory import GiB, MiB, LRUPolicy, MemoryManager, parse_bytes
from djinn_kernel.spill import SpillStore

GB = 1e9


def drop_from_page_cache(path: Path) -> None:
    """Make the file durable and drop it from the OS page cache, so the next read of it comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_bandwidth(store: SpillStore, buffer: torch.Tensor, files: int = 3) -> dict[str, object]:
    """GB/s of the disk tier's own write and read of ``buffer`` (pinned host memory), with its threads and block
    size: the write as the tier writes (from the buffer, into the page cache), the same made durable (fsync), a
    read of the file through a staging ring like the memory manager's, once dropped from the page cache (the disk
    itself, as the resumes below read it), and a second read that the page cache serves (what the tier would get
    without the drop). Each of ``files`` files is written and read so: one file's cold read varied from 1.7 to
    2.5 GB/s on the H200 machine's disk, so the figures are the medians, with every sample kept."""
    gb = buffer.numel() / GB
    staging = store.staging(pin=buffer.is_pinned())
    samples: dict[str, list[float]] = {"write": [], "durable": [], "read": [], "read_cached": []}
    for index in range(files):
        t = time.perf_counter()
        spilled = store.write(index, [buffer])
        samples["write"].append(gb / (time.perf_counter() - t))
        drop_from_page_cache(spilled.path)
        samples["durable"].append(gb / (time.perf_counter() - t))
        for kind in ("read", "read_cached"):
            t = time.perf_counter()
            store.read(spilled, staging, lambda block, pieces: None)
            samples[kind].append(gb / (time.perf_counter() - t))
        store.remove(spilled)
        store.settle()  # the next file is written and read with no unlink under way
    median = {kind: statistics.median(values) for kind, values in samples.items()}
    return {"write_gb_s": median["write"], "write_durable_gb_s": median["durable"], "read_gb_s": median["read"],
            "read_cached_gb_s": median["read_cached"], "samples_gb_s": samples, "threads": store.threads,
            "block_bytes": store.block_bytes}


def baseline_max_paused(net, prompts: list[list[int]], layer: int, device: torch.device) -> dict[str, object]:
    """Paused sessions of plain PyTorch (a blocking forward hook, KV on the GPU) before the device is full."""
    from transformers import DynamicCache

    call = ForwardCall.of(net)
    gate, arrived = threading.Event(), threading.Semaphore(0)
    failures: list[str] = []  # messages only: an exception's traceback would keep its thread's KV alive
    armed = threading.local()

    def hook(module, args, output):
        if getattr(armed, "on", False):
            arrived.release()
            gate.wait()

    def session(prompt: list[int]) -> None:
        try:
            with torch.inference_mode():
                cache = DynamicCache(config=net.config)
                logits = net(torch.tensor([prompt], device=device), **call.kwargs(cache)).logits
                token = logits[:, -1:].argmax(-1)
                del logits
                armed.on = True
                net(token, **call.kwargs(cache))
        except torch.OutOfMemoryError as exc:
            failures.append(str(exc).splitlines()[0])
            arrived.release()

    handle = net.model.layers[layer].register_forward_hook(hook)
    threads, paused = [], 0
    try:
        for prompt in prompts:
            thread = threading.Thread(target=session, args=(prompt,), daemon=True)
            thread.start()
            threads.append(thread)
            arrived.acquire()
            if failures:
                break
            paused += 1
    finally:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        gate.set()
        for thread in threads:
            thread.join()
        handle.remove()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"max_paused_sessions": paused, "stopped_by": "out of memory" if failures else "ran out of prompts",
            "peak_allocated_bytes": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (a smoke test)")
    ap.add_argument("--sessions", type=int, default=None, help="default 100 (12 with --small)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 2048 (48 with --small)")
    ap.add_argument("--layer", type=int, default=None, help="default 20 (2 with --small)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--host-memory", default=None, help="host pool, pinned at start (default 48GiB)")
    ap.add_argument("--spill-dir", default=None, help="disk tier folder (default: a temporary folder)")
    ap.add_argument("--spill-memory", default=None, help="disk tier capacity (default 60GiB); 0: no disk tier")
    ap.add_argument("--spill-threads", type=int, default=4, help="disk tier IO threads")
    ap.add_argument("--spill-block", default="16MiB", help="disk tier block, a multiple of 4 KiB")
    ap.add_argument("--workspace", default="8GiB", help="device memory left out of the session budget")
    ap.add_argument("--baseline-limit", type=int, default=None, help="most baseline sessions tried (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the run (Python's default is 0.005 s): a shorter one tells whether "
                         "a resume's wait before its copies is a wait for the GIL")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    small = args.small
    device = torch.device("cpu" if small else "cuda")
    sessions_n = args.sessions or (12 if small else 100)
    prompt_n = args.prompt_tokens or (48 if small else 2048)
    layer = args.layer if args.layer is not None else (2 if small else 20)
    new = args.new_tokens
    result: dict[str, object] = {"experiment": "exp3_whitebox (issue 8)",
                                 "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    started = time.perf_counter()

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - started
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    import transformers

    result["environment"] = {
        "device": "cpu" if small else torch.cuda.get_device_name(device), "nvidia_smi": None if small else nvidia_smi(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "switch_interval_s": sys.getswitchinterval(),
    }
    net, shape = build_model(small, device, args.seed, size="13b")
    kv_per_token = 2 * net.config.num_hidden_layers * net.config.hidden_size * net.dtype.itemsize
    session_bytes = kv_per_token * (prompt_n + new)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(3, net.config.vocab_size, (prompt_n,), generator=gen).tolist() for _ in range(sessions_n)]
    result.update(model=shape, layer=layer, prompt_tokens=prompt_n, new_tokens=new, sessions=sessions_n,
                  session_kv_bytes=session_bytes)
    log(f"model {shape['parameters'] / 1e9:.1f} B params; {sessions_n} sessions x {session_bytes / GB:.2f} GB of KV")

    # 1. tier bandwidths ---------------------------------------------------------------------------------------
    host_capacity = parse_bytes(args.host_memory) if args.host_memory else (4 * session_bytes if small else 48 * GiB)
    spill_capacity = parse_bytes(args.spill_memory) if args.spill_memory is not None else (
        64 * session_bytes if small else 60 * GiB)
    spill_dir = Path(args.spill_dir or tempfile.mkdtemp(prefix="djinn-exp3-"))
    spill_dir.mkdir(parents=True, exist_ok=True)
    probe = torch.empty(64 * MiB if small else GiB, dtype=torch.uint8, pin_memory=not small).random_(0, 256)
    pcie = copy_bandwidth(probe, torch.empty_like(probe, device=device), 5)
    spill_threads, spill_block = args.spill_threads, parse_bytes(args.spill_block)
    disk = disk_bandwidth(SpillStore(spill_dir, probe.numel(), spill_threads, spill_block), probe)
    del probe
    result["bandwidth"] = {"h2d_gb_s": pcie["h2d"]["median"], "d2h_gb_s": pcie["d2h"]["median"], **disk}
    log(f"bandwidth {result['bandwidth']}")
    save()

    # 2. baseline ------------------------------------------------------------------------------------------------
    limit = args.baseline_limit or (sessions_n if small else 200)
    baseline_prompts = [prompts[i % sessions_n] for i in range(limit)]
    t = time.perf_counter()
    result["baseline"] = baseline_max_paused(net, baseline_prompts, layer, device)
    result["baseline"]["seconds"] = time.perf_counter() - t
    result["baseline_max_paused_sessions"] = result["baseline"]["max_paused_sessions"]
    log(f"baseline: {result['baseline']}")
    save()

    # 3. Djinn: every session paused at once --------------------------------------------------------------------
    if small:
        budget = 3 * session_bytes
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget = free - parse_bytes(args.workspace)
    t = time.perf_counter()
    spill = SpillStore(spill_dir, spill_capacity, spill_threads, spill_block) if spill_capacity else None
    memory = MemoryManager(device, budget, host_capacity, LRUPolicy(), chunk_bytes=min(GiB, host_capacity),
                           host_reserve=host_capacity, spill=spill)
    result["host_pool_pinned_s"] = time.perf_counter() - t
    engine = Engine(device=device, memory=memory, deterministic=True)
    model = Model(engine, engine.register_model("13b-shape", net))
    if small:  # three sessions' KV and the prompt's activations, which admission reserves with it (prefill.py)
        budget = memory.budget = budget + engine._model("13b-shape").prefill_bytes(len(prompts[0]), len(prompts[0]), False)
    result["vram_budget_bytes"] = budget
    log(f"session budget {budget / GB:.1f} GB, host pool {host_capacity / GB:.1f} GB pinned in "
        f"{result['host_pool_pinned_s']:.1f} s, disk tier {spill_capacity / GB:.1f} GB in {spill_dir}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opened, runs, peak_session_bytes = [], [], 0
    t = time.perf_counter()
    for i, prompt in enumerate(prompts):
        s = model.session()
        s.break_at(layer, tokens=1)
        run = s.generate(prompt, new, keep_logits=True)
        assert run.paused and run.pause.token_step == 1, run
        opened.append(s)
        runs.append(run)
        peak_session_bytes = max(peak_session_bytes, engine.memory.stats()["session_gpu_bytes"])
        if (i + 1) % 10 == 0:
            log(f"{i + 1} sessions paused; memory {engine.memory.stats()['spill']}")
    result["pause_all_seconds"] = time.perf_counter() - t
    tiers = {}
    for s in opened:
        mem = s.status()["memory"]
        tiers[s.id] = "disk" if mem["disk_bytes"] else "host" if mem["host_bytes"] else "gpu"
    result["paused_at_once"] = {tier: sum(v == tier for v in tiers.values()) for tier in ("gpu", "host", "disk")}
    stats = engine.memory.stats()
    result["bytes_paged"] = {"host": stats["host_pool"]["used"], "disk": (stats["spill"] or {}).get("used", 0),
                             "page_outs": stats["page_outs"], "spills": (stats["spill"] or {}).get("spills", 0)}
    log(f"all paused: {result['paused_at_once']}, {result['bytes_paged']}")
    save()

    # 4. steering at scale ---------------------------------------------------------------------------------------
    for i, run in enumerate(runs):
        if i % 2:
            run.pause.scale(0.9)

    # 5. resume every session, timing its page-in by tier: those on the device first, then the host's, then the
    # disk's (in this order no page-in has to evict a session that is about to be resumed); a finished session
    # is closed, as its user would once done, so later page-ins find room without evicting anyone ------------------
    result["spill_files_dropped_from_page_cache"] = 0
    if spill is not None:
        spill.settle()  # the steering read some sessions back from disk: their files are being unlinked
    for path in spill_dir.glob("*.spill"):
        drop_from_page_cache(path)
        result["spill_files_dropped_from_page_cache"] += 1
    latencies: dict[str, list[float]] = {"gpu": [], "host": [], "disk": []}
    floors: dict[str, list[float]] = {"host": [], "disk": []}
    inside: dict[str, dict[str, list[float]]] = {tier: {"copies": [], "manager": [], "room": [], "call": [], "api": []}
                                                  for tier in floors}
    finished: dict[int, tuple[list[int], torch.Tensor]] = {}
    h2d, disk_read = result["bandwidth"]["h2d_gb_s"] * GB, result["bandwidth"]["read_gb_s"] * GB
    order = sorted(range(sessions_n), key=lambda i: ("gpu", "host", "disk").index(tiers[opened[i].id]))
    for i in order:
        s, run = opened[i], runs[i]
        mem = s.status()["memory"]
        tier = "disk" if mem["disk_bytes"] else "host" if mem["host_bytes"] else "gpu"
        sync(device)
        t0 = time.perf_counter()
        moved = s.page_in()
        returned = time.perf_counter()
        sync(device)
        latencies[tier].append(time.perf_counter() - t0)
        if tier == "host":
            floors[tier].append(moved["bytes"] / h2d)
        elif tier == "disk":
            floors[tier].append(max(moved["bytes"] / disk_read, moved["bytes"] / h2d)
                                + min(spill_block, moved["bytes"]) / h2d)
        if tier != "gpu":
            inside[tier]["copies"].append(moved["seconds"])
            inside[tier]["manager"].append(moved["wall_seconds"])
            inside[tier]["call"].append(moved["call_seconds"])
            inside[tier]["room"].append(moved["room_seconds"])
            inside[tier]["api"].append(returned - t0)
        run.finish()
        finished[i] = (run.tokens, run.logits)
        s.close()
    peak_vram = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result["sessions_completed"] = sum(run.state == "finished" for run in runs)
    result["resume_latency_ms"] = {tier: percentiles([v * 1e3 for v in values]) for tier, values in latencies.items()}
    result["floor_ms"] = {tier: percentiles([v * 1e3 for v in values]) for tier, values in floors.items()}
    result["page_in_inside_ms"] = {
        tier: {part: percentiles([v * 1e3 for v in values]) for part, values in parts.items()}
        for tier, parts in inside.items()
    }
    result["floor_meaning"] = (
        "host: bytes / pinned H2D bandwidth. disk: max(bytes / disk read bandwidth, bytes / H2D) + one block / H2D "
        "(the tier reads the file in blocks, several at a time, into a ring of pinned staging blocks, and copies "
        "each block to the device as it lands, so the slower of the two sets the pace and the last block's copy "
        "follows its read; it takes no host pool room, so it spills nobody); the read bandwidth is the tier's own "
        "read through such a ring of a file dropped from the page cache, as the spill files are before the resumes. "
        "page_in_inside_ms: copies = the memory manager's copy-stream time (CUDA events; for the disk tier from "
        "the first read to the last copy), manager = its wall time (allocation and bookkeeping included), call = the "
        "manager's whole page_in (its lock and making room included; room = making room alone), api = Session.page_in() until it returned; "
        "the rest of resume_latency_ms is the device synchronize after it")
    result["resume_p50_over_floor"] = {
        tier: statistics.median(latencies[tier]) / statistics.median(floors[tier]) for tier in floors if floors[tier]
    }
    result["peak_session_bytes_on_device"] = peak_session_bytes
    result["peak_vram_bytes"] = peak_vram
    log(f"completed {result['sessions_completed']}; resume ms {result['resume_latency_ms']}; "
        f"floors {result['floor_ms']}")
    save()

    # references, on the same deterministic engine, nothing paged: each session's run again with its edit (the
    # exactness check), and for the steered ones also without it (what the steering changed) -------------------
    exact, changed, unsteered_exact = 0, [], 0
    with model.session() as ref:
        for i, prompt in enumerate(prompts):
            tokens, logits = finished[i]
            plain = ref.generate(prompt, new, keep_logits=True)
            want = plain
            if i % 2:
                changed.append(sum(a != b for a, b in zip(tokens, plain.tokens)))
                bp = ref.break_at(layer, tokens=1)
                want = ref.generate(prompt, new, keep_logits=True)
                want.pause.scale(0.9)
                want.finish()
                ref.delete(bp)
            same = tokens == want.tokens and torch.equal(logits, want.logits)
            exact += same
            unsteered_exact += same and not i % 2
    result["token_accuracy"] = exact / sessions_n
    result["steering"] = {"steered_sessions": len(changed), "tokens_changed_vs_unsteered": changed,
                          "sessions_with_a_changed_token": sum(c > 0 for c in changed),
                          "unsteered_sessions_bitwise_equal": unsteered_exact}
    log(f"token accuracy {result['token_accuracy']}; steering {result['steering']}")
    save()

    # 6. concurrency: A paused and paged out while B runs a whole generation ---------------------------------------
    a, b = model.session(), model.session()
    a.break_at(layer, tokens=1)
    run_a = a.generate(prompts[0], new, keep_logits=True)
    a.page_out()
    run_b = b.generate(prompts[1], new, keep_logits=True)
    run_a.finish()
    result["concurrency"] = {
        "a_exact": run_a.tokens == finished[0][0] and torch.equal(run_a.logits, finished[0][1]),
        "b_finished": run_b.state == "finished",
    }
    a.close()
    b.close()
    if spill is not None:
        spill.settle()  # files read back or closed are unlinked off the resume path
    result["spill_files_left"] = len(list(spill_dir.glob("*.spill")))
    engine.shutdown()
    result["targets"] = {
        "sessions_completed": {"target": ">= 100 with the disk tier (>= 50 without)",
                               "passed": result["sessions_completed"] >= (100 if spill else 50)},
        "token_accuracy": {"target": "1.0", "passed": result["token_accuracy"] == 1.0},
        "peak_within_budget": {"target": "session bytes on the device <= budget",
                               "passed": peak_session_bytes <= budget},
        "resume_p50": {"target": "<= 1.2 x floor per tier",
                       "passed": all(v <= 1.2 for v in result["resume_p50_over_floor"].values())},
    }
    log(f"concurrency {result['concurrency']}; targets {result['targets']}")
    save()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
