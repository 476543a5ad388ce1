"""Cluster benchmark (issue #18): Djinn on a Ray cluster of engines, one per GPU (djinn_kernel/cluster).

One process, one Ray runtime (started here), measures, in this order:

1. throughput: for each engine count in ``--gpus`` (capped at the GPUs Ray reports), a ``ClusterBackend`` of that
   many engines (``connect_cluster`` on the Ray started here, so ``backend.shutdown()`` stops the engines but not
   Ray between counts). The model is registered once per cluster and built on each engine that takes it; for each
   session count in ``--sessions``, that many sessions are opened and spread round-robin over the engines (an
   opened, never-run session is migrated to engine ``i % n``: placement alone fills the engine holding the model
   first), then every session generates ``--new-tokens`` greedy tokens from its own thread, all started together.
   ``aggregate_tokens_per_s[gpus][sessions]`` = the new tokens of all sessions (counted from the runs) / the wall
   time from the start barrier to the last run's end (prefill of the 16-token prompts included). One untimed
   warm-up round (one session per engine, 4 tokens) precedes the timed ones for each engine count.
   ``scaling_2gpu`` / ``scaling_4gpu``: the aggregate at 2 / 4 engines over this run's 1-engine figure, at the
   largest session count (32 by default; targets >= 1.9 and >= 3.7);
2. migration (needs 2 engines): a PAUSED session with ``--context`` tokens of context is migrated engine 0 -> 1
   (``session.migrate(engine=1)``), wall time of the call: its history is a ``--context - 2``-token prompt and one
   generated token, then a continuation run of one token pauses at the middle layer of its token step 1, and
   moves (migration.py: the KV of the ``--context - 2`` tokens the session holds travels; the run is replayed on
   the target to the same pause: a prefill of its two tokens, the generated one and the new one, and the next
   step's layers up to the pause); the run then finishes there. The same session idle
   (after that run) is migrated back, 1 -> 0, for comparison (``migration_idle``).
   ``migration_floor_s`` = the state bytes the migration reports / a host-mediated bandwidth
   measured in the same run, the path a migration's state takes: a tensor of those bytes is copied device 0 ->
   host (on GPU), ``ray.put`` into the object store and fetched by a Ray task in another process (which returns
   only its size), then host -> device 1 (on GPU); the sum of the three, median of 3 after one warm-up, is the
   floor; ``migration_ratio`` = migration_s / migration_floor_s (target <= 1.3);
3. the layer split (split.py, needs 2 engines): Llama-2-70B's shape, bf16, split in two halves of 40 layers over
   two engines (``ClusterBackend.register_split``; each half, with the embeddings and head, built on its own GPU
   from a recipe that builds only that half: 70B does not fit one GPU). ``split70b_ms_per_token``: one session's
   decode at batch 1, the time of a 32-token run less a 1-token run, over 31; ``split70b_floor_ms``: the weight
   bytes of both halves / the HBM bandwidth of a device-to-device copy measured in this process (at batch 1 the
   halves run one after the other, so every token reads every weight once); a run paused at layer 60 (the host's
   half) at token step 1 and resumed, its tokens against the unpaused run's.

The model: Llama-2-7B's shape, bf16, random weights (seed 0), built on each engine's GPU. No built-in name asks an
engine for a random 7B shape (builtin.py has tiny-llama, tiny-gpt2, smollm2-135m), so the backend's
``register_model`` is given a ``RandomLlama`` recipe: it pickles to its shape and seed only, and unpickling it in the
engine's process builds the model there, on that engine's GPU (no 13 GB of weights through the object store). The
model has no tokenizer, so prompts are token-id lists, and no EOS ids, so every run gives all its tokens. With
``--small``, the same recipe with a tiny Llama shape, fp32, on CPU engines standing in for GPUs (a custom Ray
resource, as tests/test_cluster.py does): a smoke test of the script, not a measurement.

JSON (``--out``) is rewritten after each step, so a run cut short keeps what it measured.

    PYTHONPATH=.:experiments python3 experiments/bench_cluster.py --out experiments/results/cluster_h200x2.json
    PYTHONPATH=.:experiments python3 experiments/bench_cluster.py --small --gpus 1,2 --sessions 2 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench_decode import hbm_bandwidth
from bench_paging import LLAMA_SHAPES, environment, log

SMALL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=256)
MODEL = "llama2-7b-shape-random"
SPLIT_MODEL = "llama2-70b-shape-random"
PROMPT_TOKENS = 16
RESOURCE_SMALL = "djinn_gpu"


def _build_random_llama(shape: dict, dtype: str, seed: int, max_positions: int,
                        layers: tuple[int, int] | None = None) -> torch.nn.Module:
    """A seeded random Llama of ``shape`` built in the calling process, on its GPU if it has one (an engine's
    process sees only its own GPU), else on the CPU. ``layers``: build only decoder layers ``first .. end - 1``
    (and the embeddings, norm and head), the others empty modules, for one side of a split too large for one GPU;
    weights then come from a normal(0, initializer_range) draw of their own, not those of the whole model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        if layers is None:
            with device:
                return LlamaForCausalLM(config).eval()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        for i in range(config.num_hidden_layers):
            if not layers[0] <= i < layers[1]:
                model.model.layers[i] = torch.nn.Module()
        model = model.to_empty(device=device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, config.initializer_range)
        with device:
            model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were left empty
        return model.eval()
    finally:
        torch.set_default_dtype(previous)


class RandomLlama:
    """What the driver hands ``register_model``: pickles to (``_build_random_llama``, its arguments), so the
    model is built where it is unpickled, in the engine's process."""

    def __init__(self, shape: dict, dtype: str, seed: int, max_positions: int,
                 layers: tuple[int, int] | None = None) -> None:
        self.args = (dict(shape), dtype, seed, max_positions, layers)

    def __reduce__(self) -> tuple[Any, tuple]:
        return _build_random_llama, self.args


def write(out: Path | None, result: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def spread(model: Any, count: int, engines: int) -> list[Any]:
    """``count`` new sessions, session i on engine i % engines (moved there while empty)."""
    sessions = [model.session() for _ in range(count)]
    for i, session in enumerate(sessions):
        session.migrate(engine=i % engines)
    return sessions


def throughput(sessions: list[Any], prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Every session generates ``new_tokens`` from its own thread, started together: tokens / wall seconds."""
    barrier = threading.Barrier(len(sessions) + 1)
    counts: list[int] = [0] * len(sessions)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        barrier.wait()
        try:
            run = sessions[i].generate(prompts[i], new_tokens)
            counts[i] = len(run.tokens)
        except BaseException as exc:  # reported below, after the other threads end
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return {"tokens": sum(counts), "wall_s": wall, "tokens_per_s": sum(counts) / wall}


def transfer_floor(ray: Any, nbytes: int, cuda_devices: int) -> dict[str, Any]:
    """Seconds to carry ``nbytes`` the way a migration's state goes: device 0 -> host, the object store to another
    process, host -> device 1 (the device legs only with 2 GPUs visible here); median of 3 after a warm-up."""

    @ray.remote(num_cpus=0)
    def receive(t: torch.Tensor) -> int:
        return t.numel()

    gpu = cuda_devices >= 2
    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0" if gpu else "cpu").fill_(7)
    reps = []
    for rep in range(4):
        t0 = time.perf_counter()
        host = source.to("cpu") if gpu else source
        if gpu:
            torch.cuda.synchronize(0)
        t1 = time.perf_counter()
        ref = ray.put(host)
        assert ray.get(receive.remote(ref)) == nbytes
        t2 = time.perf_counter()
        if gpu:
            host.to("cuda:1")
            torch.cuda.synchronize(1)
        t3 = time.perf_counter()
        del ref
        if rep:
            reps.append((t1 - t0, t2 - t1, t3 - t2))
    legs = [sorted(r[k] for r in reps)[len(reps) // 2] for k in range(3)]
    total = sorted(sum(r) for r in reps)[len(reps) // 2]
    return {"bytes": nbytes, "seconds": total, "gb_s": nbytes / total / 1e9,
            "d2h_s": legs[0] if gpu else None, "object_store_s": legs[1], "h2d_s": legs[2] if gpu else None,
            "device_legs": gpu,
            "what": "median of 3 (after 1 warm-up) of: cuda:0 -> host copy, ray.put + a Ray task in another "
                    "process receiving it, host -> cuda:1 copy (device legs only with 2 GPUs visible to the driver)"}


def split_decode(backend: Any, shape: dict, dtype: str, seed: int, max_positions: int, rng: random.Random,
                 tokens: int, pause_layer: int) -> dict[str, Any]:
    """The model split in two halves over the backend's two engines (``register_split``, each half built on its
    own GPU): ms per decoded token at batch 1 (a run of ``tokens`` less a run of 1, same prompt, over the
    difference), and a run paused at ``pause_layer`` at token step 1, resumed, against the same run unpaused."""
    from djinn_kernel.api import Model

    layers = shape["num_hidden_layers"]
    at = layers // 2
    info = backend.register_split(SPLIT_MODEL, RandomLlama(shape, dtype, seed, max_positions, (at, layers)), at,
                                  stage_model=RandomLlama(shape, dtype, seed, max_positions, (0, at)))
    session = Model(backend, info).session()
    words = prompt(rng, shape["vocab_size"], PROMPT_TOKENS)
    session.generate(words, 4)  # warm-up
    t0 = time.perf_counter()
    session.generate(words, 1)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = session.generate(words, tokens)
    many = time.perf_counter() - t0
    session.break_at(pause_layer, tokens=1)
    run = session.generate(words, tokens)
    paused_at = (run.pause.layer, run.pause.token_step) if run.paused else None
    run.finish()
    session.close()
    weight_bytes = info["weight_bytes"] + info["split"]["stage_weight_bytes"]
    return {"split_at": at, "host": info["split"]["host"], "stage": info["split"]["stage"],
            "weight_bytes": weight_bytes, "ms_per_token": 1e3 * (many - one) / (tokens - 1),
            "run_1_token_s": one, f"run_{tokens}_tokens_s": many, "paused_at": paused_at,
            "paused_run_tokens_equal": run.tokens == plain.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model on CPU engines: a smoke test")
    parser.add_argument("--gpus", default="1,2,4", help="engine counts, comma-separated (capped at Ray's GPUs)")
    parser.add_argument("--sessions", default="8,32", help="session counts, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens each session generates (128; small 8)")
    parser.add_argument("--context", type=int, default=None, help="the migrated session's context (2048; small 64)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    import transformers

    from djinn_kernel.api import Model
    from djinn_kernel.cluster import connect_cluster

    small = args.small
    wanted = sorted({int(g) for g in args.gpus.split(",")})
    session_counts = sorted({int(s) for s in args.sessions.split(",")})
    new_tokens = args.new_tokens or (8 if small else 128)
    context = args.context or (64 if small else 2048)
    shape = SMALL_SHAPE if small else LLAMA_SHAPES["7b"]
    dtype = "float32" if small else args.dtype
    max_positions = max(4096, context + 64)

    if small:
        resource = RESOURCE_SMALL
        ray.init(num_cpus=2, resources={resource: max(wanted)}, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        engine_options: dict[str, Any] = {"device": "cpu", "host_memory": "64MiB"}
    else:
        resource = "GPU"
        ray.init(include_dashboard=False, log_to_driver=False)
        engine_options = {}
    have = int(ray.cluster_resources().get(resource, 0))
    counts = [g for g in wanted if g <= have]
    log(f"Ray up: {have} {resource}; engine counts {counts} (asked {wanted}), sessions {session_counts}")

    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    env = environment(device)
    env.update(ray=ray.__version__, transformers=transformers.__version__, gpu_count=have if not small else 0)
    result: dict[str, Any] = {
        "benchmark": "cluster", "small": small, "environment": env,
        "model": {"name": MODEL if not small else "tiny-llama-shape-random", "shape": shape, "dtype": dtype,
                  "seed": args.seed, "weights": "random, built on each engine's device (RandomLlama recipe; "
                  "no engine-side built-in name exists for a random 7B shape)"},
        "gpus_asked": wanted, "gpus_run": counts, "sessions": session_counts, "new_tokens": new_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "aggregate_tokens_per_s": {}, "throughput_runs": {},
        "scaling_2gpu": None, "scaling_4gpu": None,
        "migration_s": None, "migration_floor_s": None, "migration_ratio": None, "migration": None,
        "split70b_ms_per_token": None, "split70b_floor_ms": None,
        "split70b_reason": "not run yet",
        "notes": {
            "aggregate_tokens_per_s": "keyed by engine (GPU) count, then session count: all sessions' new tokens "
                                      "/ wall seconds from the common start to the last run's end (prefill included)",
            "scaling": "aggregate at 2 (4) engines / at 1 engine, largest session count, same run",
            "migration": "a PAUSED session (replayed to its pause on the target): wall time of session.migrate"
                         "(engine=1); floor = its state bytes / the host-mediated transfer measured here; "
                         "migration_idle: the same session idle, moved back",
        },
    }
    write(args.out, result)
    rng = random.Random(args.seed)
    vocab = shape["vocab_size"]
    largest = max(session_counts)

    for n in counts:
        log(f"{n} engine(s): starting")
        t0 = time.perf_counter()
        backend = connect_cluster(engines=n, resource=resource, engine_options=engine_options, start_timeout=600)
        try:
            info = backend.register_model(MODEL, RandomLlama(shape, dtype, args.seed, max_positions))
            model = Model(backend, info)
            warm = spread(model, n, n)  # loads the model on every engine, untimed
            throughput(warm, [prompt(rng, vocab, PROMPT_TOKENS) for _ in warm], 4)
            for s in warm:
                s.close()
            log(f"{n} engine(s): up and warm in {time.perf_counter() - t0:.1f} s")
            per_count: dict[str, float] = {}
            runs: dict[str, dict] = {}
            for count in session_counts:
                sessions = spread(model, count, n)
                try:
                    figure = throughput(sessions, [prompt(rng, vocab, PROMPT_TOKENS) for _ in sessions], new_tokens)
                finally:
                    for s in sessions:
                        s.close()
                per_count[str(count)] = figure["tokens_per_s"]
                runs[str(count)] = figure
                log(f"{n} engine(s), {count} sessions: {figure['tokens']} tokens in {figure['wall_s']:.2f} s = "
                    f"{figure['tokens_per_s']:.1f} tokens/s")
            result["aggregate_tokens_per_s"][str(n)] = per_count
            result["throughput_runs"][str(n)] = runs
            one = result["aggregate_tokens_per_s"].get("1", {}).get(str(largest))
            for k, key in ((2, "scaling_2gpu"), (4, "scaling_4gpu")):
                mine = result["aggregate_tokens_per_s"].get(str(k), {}).get(str(largest))
                if one and mine:
                    result[key] = mine / one
            write(args.out, result)

            if n >= 2 and result["migration"] is None:
                session = model.session()
                session.migrate(engine=0)
                session.generate(prompt(rng, vocab, context - 2), 1)
                layer = shape["num_hidden_layers"] // 2
                session.break_at(layer, tokens=1)
                run = session.generate(prompt(rng, vocab, 1), 2, fresh=False)
                assert run.paused and run.pause.layer == layer, run
                moved = session.migrate(engine=1)
                run.finish()
                session.delete()
                idle = session.migrate(engine=0)
                session.close()
                floor = transfer_floor(ray, int(moved["bytes"]), torch.cuda.device_count() if not small else 0)
                result["migration"] = {**moved, "context_tokens": context, "state": "paused", "pause_layer": layer,
                                       "floor": floor}
                result["migration_idle"] = idle
                result["migration_s"] = moved["seconds"]
                result["migration_floor_s"] = floor["seconds"]
                result["migration_ratio"] = moved["seconds"] / floor["seconds"]
                log(f"paused migration of {moved['bytes'] / 2**20:.1f} MiB ({moved['history_tokens']} tokens): "
                    f"{moved['seconds'] * 1e3:.1f} ms; floor {floor['seconds'] * 1e3:.1f} ms "
                    f"({floor['gb_s']:.2f} GB/s) -> {result['migration_ratio']:.2f}x; idle, moved back: "
                    f"{idle['seconds'] * 1e3:.1f} ms")
                write(args.out, result)
        finally:
            backend.shutdown()
    if result["migration"] is None:
        result["migration_reason"] = "needs 2 engines; fewer were run"
    write(args.out, result)

    if have >= 2:
        split_shape = SMALL_SHAPE if small else LLAMA_SHAPES["70b"]
        pause_layer = 3 if small else 60
        hbm = None if small else hbm_bandwidth(torch.device("cuda"))
        log(f"split: {'tiny' if small else '70B'} shape over 2 engines, pause at layer {pause_layer}")
        backend = connect_cluster(engines=2, resource=resource, engine_options=engine_options, start_timeout=900)
        try:
            split = split_decode(backend, split_shape, dtype, args.seed, max_positions, rng, 8 if small else 32,
                                 pause_layer)
        finally:
            backend.shutdown()
        split.update(shape=split_shape, hbm_bandwidth_gb_s=None if hbm is None else hbm / 1e9)
        result["split70b"] = split
        result["split70b_ms_per_token"] = split["ms_per_token"]
        result["split70b_floor_ms"] = None if hbm is None else 1e3 * split["weight_bytes"] / hbm
        result["split70b_reason"] = None
        log(f"split: {split['ms_per_token']:.2f} ms per token, floor {result['split70b_floor_ms']} ms; paused at "
            f"{split['paused_at']}, tokens equal to the unpaused run: {split['paused_run_tokens_equal']}")
    else:
        result["split70b_reason"] = "needs 2 engines (GPUs); fewer were available"
    write(args.out, result)
    ray.shutdown()
    log("done: " + json.dumps({k: result[k] for k in ("aggregate_tokens_per_s", "scaling_2gpu", "scaling_4gpu",
                                                        "migration_s", "migration_floor_s", "migration_ratio",
                                                        "split70b_ms_per_token", "split70b_floor_ms")}))


if __name__ == "__main__":
    main()
