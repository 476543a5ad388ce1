"""The layer split on one GPU (split.py; issue #18): what splitting costs where no second GPU is lent.

Two checks in one process, both engines of each split on the same GPU, the stage called in process (``EngineStage``;
on a cluster the call is a Ray call to another GPU's engine, which bench_cluster.py measures where two GPUs exist):

1. exactness on CUDA: tiny-llama split 2 + 2 against the whole model, deterministic engines: the first run's tokens
   and logits, then a run paused at a stage layer and a host layer with an edit at each, its activations at both
   pauses, tokens and logits (``tiny_cuda_bitwise``);
2. cost: Llama-2-7B's shape, bf16, random (seed 0), module path, the first 16 layers on the stage: ms per decoded
   token at batch 1 (a 65-token run less a 1-token run, over 64, after a warm-up run), whole against split, and
   whether their greedy tokens are equal (``7b_module_path_same_gpu``, ``7b_tokens_equal``). The split pays one
   stage call per forward (its 16 remote layers run as one stretch: no breakpoint between them).

    PYTHONPATH=.:experiments python3 experiments/bench_split.py --out $OUT/split_h200.json   # GPU only, ~30 s
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import djinn_kernel as dj
from bench_paging import build_model
from djinn_kernel.edits import Scale
from djinn_kernel.engine import Engine
from djinn_kernel.split import EngineStage


def exactness() -> dict[str, object]:
    whole, host, stage = (Engine(device="cuda", deterministic=True) for _ in range(3))
    try:
        plain = dj.load("tiny-llama", backend=whole)
        stage.serve_stage("tiny-llama", 2)
        split = dj.Model(host, host.serve_split("tiny-llama", 2, EngineStage(stage, "tiny-llama:layers0-1")))
        sessions = [m.session() for m in (plain, split)]
        first = [s.generate("Hello, world", 6, keep_logits=True) for s in sessions]
        for s in sessions:
            s.break_at(1, tokens=1)
            s.break_at(3, tokens=0)
        runs = [s.generate(" and then", 5, fresh=False, keep_logits=True) for s in sessions]
        activations = []
        while runs[0].state == "paused":
            activations.append(torch.equal(runs[0].pause.activation, runs[1].pause.activation))
            for run in runs:
                run.pause.apply(Scale(1.5))
                run.resume()
        return {"first": first[0].tokens == first[1].tokens and torch.equal(first[0].logits, first[1].logits),
                "paused_run": runs[0].tokens == runs[1].tokens and torch.equal(runs[0].logits, runs[1].logits),
                "activations": activations}
    finally:
        for engine in (host, stage, whole):
            engine.shutdown()


def cost() -> dict[str, object]:
    device = torch.device("cuda")
    nets = [build_model(False, device, 0, dtype=torch.bfloat16)[0] for _ in range(3)]
    whole, host, stage = (Engine(device="cuda", fast=False) for _ in range(3))
    plain = dj.Model(whole, whole.register_model("w", nets[0]))
    stage.register_stage("s", nets[1], range(0, 16))
    split = dj.Model(host, host.register_split("h", nets[2], range(0, 16), EngineStage(stage, "s")))
    prompt = list(range(3, 131))
    figures = {}
    for name, model in (("whole", plain), ("split", split)):
        session = model.session()
        session.generate(prompt, 8)
        torch.cuda.synchronize()
        t = time.perf_counter()
        session.generate(prompt, 1)
        torch.cuda.synchronize()
        one = time.perf_counter() - t
        t = time.perf_counter()
        run = session.generate(prompt, 65)
        torch.cuda.synchronize()
        many = time.perf_counter() - t
        figures[name] = {"ms_per_token": 1e3 * (many - one) / 64, "tokens": run.tokens}
        session.close()
    return {"7b_module_path_same_gpu": {k: v["ms_per_token"] for k, v in figures.items()},
            "7b_tokens_equal": figures["whole"]["tokens"] == figures["split"]["tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_split: needs a CUDA GPU")
        return 2
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "tiny_cuda_bitwise": exactness()}
    out.update(cost())
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
