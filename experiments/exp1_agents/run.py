"""Experiment 1 (issue 10): agent density at a latency target under four paging policies.

Agents alternate between generating (a round) and waiting on a tool. Each agent is one session: a prompt, then
rounds of generating 50-100 tokens, a tool wait, and the tool's result appended to the same conversation
(``generate(..., fresh=False)`` over the kept KV). Around every tool call the driver signals ``io_wait`` (with the
tool's real duration as an oracle hint) and ``compute`` (djinn_kernel.agents). One process, one model:

1. a seeded random Llama-2-7B-shape model in bf16 built on the GPU (13B would not leave time for the sweep in the
   8 minutes this run may take), served by an in-process ``Engine`` on the fast path, with a session VRAM budget of
   ``--budget-agents`` agents' peak KV, so holding every agent's KV runs out;
2. the uncontended round latency: a few agents run one at a time under ``hold`` (no pressure, tool waits cut to
   1%, which alone and unpaged changes nothing in a round), twice; the target is 2 x the second pass's p99. The
   first pass is reported too (``uncontended_cold``): prompt lengths not seen before compile kernels, and one
   such round (0.96 s against a p50 of 0.39 s on the H200) was the p99 of two earlier runs, doubling the target;
3. the sweep: for each agent count (ascending) and each policy (interleaved, so a cut-off leaves comparable data),
   agents arrive as a Poisson process of a fixed rate and run their scripts at once; per cell: completed rounds, p50/p99 round
   latency, time spent queueing for memory, swap counts and seconds, peak VRAM, and whether p99 <= target. A
   policy that misses the target at two counts in a row is not run at larger ones;
   At each count a control cell runs too (``hold-unbounded``: hold with room for every agent's KV, so nothing
   pages or queues), whose latency is what the agents cost in compute alone;
4. exactness: a fresh model with the same seed under ``Engine(deterministic=True)`` (math attention), a budget of
   1.5 agents so that agents must be paged, a few short agents at once under each policy, every round's tokens
   against the same agent run alone.

Tool waits are uniform 1-10 s (the issue's example is 2-20 s; halved so that the sweep fits one 10-minute device
call), with three rounds per agent; the JSON says so. With waits ten times shorter (0.2-2 s) the sweep measured
compute contention rather than memory: agents spent most of their time generating, so holding their KV cost little.
Progress goes to stdout with timestamps, and the JSON at ``--out`` is rewritten after every cell (``complete``
is false until the end). A sweep longer than one call of the device tool (10 minutes) runs in parts: ``--until N``
stops after count N and leaves the run open; ``--resume JSON`` continues it in a new process, with the same
model, agents, budget and target, and its own uncontended pass recorded beside the first's. ``--extend JSON
--policies NAMES`` sweeps more policies on a complete run in the same way (same agents, arrival times and target),
checks them, and summarizes over all its policies.

    PYTHONPATH=$PWD:$PWD/experiments python3 experiments/exp1_agents/run.py --out $OUT/exp1_h200.json   # GPU
    PYTHONPATH=$PWD:$PWD/experiments python3 experiments/exp1_agents/run.py --small --out /tmp/exp1.json  # CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench_paging import START, build_model, log, nvidia_smi, quantile
from djinn_kernel.agents import AgentRun, AgentScript, RoundRecord, random_script
from djinn_kernel.api import Model
from djinn_kernel.engine import Engine
from djinn_kernel.memory import GiB, MiB, MemoryManager
from djinn_kernel.policies import POLICIES, make_policy

MODEL = "llama2-7b-shape-random"
SIGNAL_DRIVEN = ("signal", "signal-keep-short")
# Hold with a budget that fits every agent's KV: no paging and no queueing for memory, so its latency is what the
# agents cost in compute alone. Run next to the policies at each count, it tells a latency limit of the serving
# core from one of memory; it takes no part in the density figures.
CONTROL = "hold-unbounded"
STOPPED = "stopped: "  # an agent error with this prefix: its remaining rounds were not run, none failed


@dataclass(frozen=True)
class Config:
    counts: tuple[int, ...]
    prompt_tokens: tuple[int, int]
    rounds: int
    new_tokens: tuple[int, int]
    tool_s: tuple[float, float]
    result_tokens: tuple[int, int]
    arrival_rate: float  # agents arriving per second (a Poisson process), the same at every count
    budget_agents: float  # session VRAM budget, in agents' peak KV
    uncontended_agents: int
    cell_timeout_s: float
    deadline_s: float  # the sweep stops starting cells after this (script time), leaving room for the check
    repeats: int  # cells per (count, policy), each with its own arrival times; a count's p99 pools their rounds
    control: bool  # also a CONTROL cell at each count
    check: dict
    policies: tuple[str, ...] = tuple(POLICIES)  # swept and checked; hold, lru and a signal-driven one at least

    @staticmethod
    def make(small: bool) -> Config:
        if small:
            return Config(counts=(1, 2, 4), prompt_tokens=(24, 48), rounds=3, new_tokens=(4, 8),
                          tool_s=(0.05, 0.2), result_tokens=(4, 8), arrival_rate=10.0, budget_agents=1.5,
                          uncontended_agents=2, cell_timeout_s=20, deadline_s=40, repeats=1, control=True,
                          check={"agents": 3, "prompt_tokens": (16, 24), "rounds": 3, "new_tokens": (3, 5),
                                 "tool_s": (0.02, 0.08), "result_tokens": (3, 6)})
        return Config(counts=(8, 16, 32, 48, 64), prompt_tokens=(1024, 2048), rounds=3,
                      new_tokens=(50, 100), tool_s=(1.0, 10.0), result_tokens=(16, 64), arrival_rate=8.0,
                      budget_agents=6.0, uncontended_agents=8, cell_timeout_s=60, deadline_s=430, repeats=1, control=True,
                      check={"agents": 4, "prompt_tokens": (256, 512), "rounds": 3, "new_tokens": (8, 12),
                             "tool_s": (0.05, 0.2), "result_tokens": (8, 16)})


def scripts(seed: int, n: int, vocab: int, prompt: tuple[int, int], **kw) -> list[AgentScript]:
    """Agent ``i`` is the same script in every cell (seed + i), so policies are compared on the same agents."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        out.append(random_script(seed * 1000 + i, vocab, prompt_tokens=rng.randint(*prompt), **kw))
    return out


def script_tokens(script: AgentScript) -> int:
    return sum(len(s.input) + s.max_new_tokens for s in script.steps)


def admission_room(engine: Engine, name: str, scripts_: list[AgentScript], fast: bool) -> int:
    """The activations of the longest prompt (a chunk at most) at the longest context of any agent: what admission
    reserves beyond a round's KV until its prompt is in (djinn_kernel/prefill.py). Budgets are so many agents'
    KV plus this once."""
    longest = max(len(s.input) for script in scripts_ for s in script.steps)
    context = max(script_tokens(script) for script in scripts_)
    return engine._model(name).prefill_bytes(min(longest, engine.prefill_chunk), context, fast)


class CellStopped(Exception):
    """The cell ran out of time, or every live agent waited for memory that nothing would free."""


class Room:
    """Where agents refused at admission (``OutOfMemoryError``) wait for room: woken when any agent's round ends
    or tool call starts (its KV may be paged then), and every 20 ms, since a background page-out does not wake it."""

    def __init__(self, stop: threading.Event) -> None:
        self.cond = threading.Condition()
        self.stop = stop
        self.waiting = 0
        self.alive = 0
        self.refusals = 0

    def wait(self) -> None:
        with self.cond:
            if self.stop.is_set():
                raise CellStopped()
            self.refusals += 1
            self.waiting += 1
            self.cond.wait(0.02)
            self.waiting -= 1

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()


class Sampler(threading.Thread):
    """Samples the sessions' device bytes every 50 ms (peak KV on the GPU) and ends a cell that stalls."""

    def __init__(self, engine: Engine, room: Room, stop: threading.Event, timeout_s: float) -> None:
        super().__init__(name="exp1-sampler", daemon=True)
        self.engine, self.room, self.stop, self.timeout_s = engine, room, stop, timeout_s
        self.done = threading.Event()
        self.peak_kv = 0
        self.reason: str | None = None

    def run(self) -> None:
        started = time.monotonic()
        stalled_since = None
        while not self.done.wait(0.05):
            self.peak_kv = max(self.peak_kv, self.engine.memory.resident_total())
            now = time.monotonic()
            with self.room.cond:
                stalled = self.room.alive > 0 and self.room.waiting == self.room.alive
            stalled_since = (stalled_since or now) if stalled else None
            if stalled_since is not None and now - stalled_since > 2.0:
                self.reason = "stalled: every live agent waited 2 s for memory that only another agent could free"
            elif now - started > self.timeout_s:
                self.reason = f"cell timeout {self.timeout_s:.0f} s"
            if self.reason:
                self.stop.set()
                self.room.notify()
                return


def run_agents(engine: Engine, model: Model, agent_scripts: list[AgentScript], offsets: list[float],
               timeout_s: float) -> dict:
    """Run the agents (agent ``i`` starts at ``offsets[i]`` s), each on its own thread and session; their records."""
    stop = threading.Event()
    room = Room(stop)
    sampler = Sampler(engine, room, stop, timeout_s)
    results: dict[int, dict] = {}
    t0 = time.monotonic() + 0.05

    def agent(i: int) -> None:
        if stop.wait(max(t0 + offsets[i] - time.monotonic(), 0)):
            results[i] = {"records": [], "error": "not started (cell stopped)"}
            return
        with room.cond:
            room.alive += 1

        def tool(index: int, seconds: float) -> None:
            """The simulated tool: its wait, cut short when the cell stops."""
            room.notify()
            if stop.wait(seconds):
                raise CellStopped()

        records: list[RoundRecord] = []
        error = None
        try:
            with model.session() as session:
                run = AgentRun(session, agent_scripts[i], tool, room.wait, records)
                run.run()
        except CellStopped:
            error = STOPPED + (sampler.reason or "cell stopped")
        except Exception as exc:  # noqa: BLE001 - one agent's failure is a result of the experiment, not its end
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with room.cond:
                room.alive -= 1
            room.notify()
        results[i] = {"records": records, "error": error}

    threads = [threading.Thread(target=agent, args=(i,), name=f"exp1-agent-{i}", daemon=True)
               for i in range(len(agent_scripts))]
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:  # a stop cannot interrupt a generate call: give the last rounds time, then report them hung
        t.join(max(t0 + timeout_s + 60 - time.monotonic(), 0.1))
    sampler.done.set()
    sampler.join()
    hung = {"records": [], "error": "hung: the agent's thread did not end 60 s after the cell's timeout"}
    return {"agents": [results.get(i, hung) for i in range(len(agent_scripts))], "peak_kv": sampler.peak_kv,
            "stopped": sampler.reason, "refusals": room.refusals, "wall_s": time.monotonic() - t0}


def poisson_offsets(rng: random.Random, n: int, window_s: float) -> list[float]:
    """Arrival times of ``n`` agents, a Poisson process of rate ``n / window_s`` starting at 0."""
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(n / window_s)
    return out


def round_rows(policy: str, count: int, outcome: dict) -> list[dict]:
    rows = []
    for agent, result in enumerate(outcome["agents"]):
        for r in result["records"]:
            rows.append({"policy": policy, "agents": count, "agent": agent, "round": r.index,
                         "latency_s": r.latency_s, "queued_s": r.queued_s, "tokens": len(r.tokens),
                         "tool_s": r.tool_s, "paged_at_tool_call": None if r.io_wait is None else r.io_wait["paging"],
                         "error": r.error, "started_monotonic_s": r.started, "timing": r.timing})
    return rows


def time_split(rows: list[dict]) -> dict[str, float] | None:
    """Where the rounds' wall time went, summed over the rounds (``Run.timing``): the admission that let each
    start (its KV paged back in, others paged out for room), their own prompt forwards, the decode steps they were
    in, steps alone, other agents' prompt forwards while they decoded; the driver's waits for memory between
    refused admissions (``queued_s``); and the rest (the refused admissions themselves, the request path, the step
    loop's host work between steps)."""
    timed = [r for r in rows if r["timing"]]
    if not timed:
        return None
    parts = {key: sum(r["timing"].get(key, 0.0) for r in timed)
             for key in ("admit_s", "prefill_s", "decode_s", "solo_s", "others_prefill_s")}
    parts["queued_s"] = sum(r["queued_s"] for r in timed)
    wall = sum(r["latency_s"] for r in timed)
    parts["rest_s"] = wall - sum(parts.values())
    steps = sum(r["timing"]["decode_steps"] for r in timed)
    mean = {"ms_per_decode_step": 1e3 * parts["decode_s"] / steps if steps else None,
            "rows_per_decode_step": sum(r["timing"]["decode_rows"] for r in timed) / steps if steps else None}
    return {**parts, "wall_s": wall, "rounds": len(timed), **mean}


def failed_rounds(outcome: dict) -> int:
    """Rounds that ended in an error, and the round an agent was in when an exception ended it (not a stop)."""
    errored = sum(r.error is not None for a in outcome["agents"] for r in a["records"])
    raised = sum(1 for a in outcome["agents"] if a["error"] and not a["error"].startswith((STOPPED, "not started")))
    return errored + raised


def summarize(policy: str, count: int, outcome: dict, expected_rounds: int, target_s: float, swaps: dict,
              peak_allocated: int | None, budget: int) -> dict:
    records: list[RoundRecord] = [r for a in outcome["agents"] for r in a["records"]]
    done = [r for r in records if r.error is None]
    lat = [r.latency_s for r in done]
    later = [r.latency_s for r in done if r.index > 0]
    first = [r.latency_s for r in done if r.index == 0]
    p99 = quantile(lat, 0.99)
    complete = len(done) == expected_rounds
    return {
        "policy": policy, "agents": count, "wall_s": outcome["wall_s"],
        "completed_rounds": len(done), "expected_rounds": expected_rounds,
        "failed_rounds": failed_rounds(outcome),
        "agent_errors": [a["error"] for a in outcome["agents"] if a["error"]],
        "stopped": outcome["stopped"],
        "latency_s": {"p50": quantile(lat, 0.5), "p99": p99, "max": max(lat, default=None)},
        "continuation_rounds_latency_s": {"p50": quantile(later, 0.5), "p99": quantile(later, 0.99)},
        "first_rounds_latency_s": {"p50": quantile(first, 0.5), "p99": quantile(first, 0.99)},
        "queueing": {"rounds_that_queued": sum(r.queued_s > 0 for r in done),
                     "seconds": sum(r.queued_s for r in done), "admission_refusals": outcome["refusals"]},
        "swap": swaps,
        "peak_vram": {"session_kv_bytes_sampled": outcome["peak_kv"], "session_budget_bytes": budget,
                      "torch_max_allocated_bytes": peak_allocated},
        "meets_target": bool(complete and p99 is not None and p99 <= target_s),
    }


def swap_stats(engine: Engine, n_transfers: int, phases_before: dict, growth_before: int) -> dict:
    moved = list(engine.memory.transfers)[n_transfers:]
    phases = engine.phases.stats()
    out = {d: [t for t in moved if t.direction == d] for d in ("out", "in")}
    return {
        "page_outs": len(out["out"]), "page_ins": len(out["in"]),
        "bytes_out": sum(t.nbytes for t in out["out"]), "bytes_in": sum(t.nbytes for t in out["in"]),
        "copy_seconds": sum(t.seconds for t in moved), "wall_seconds": sum(t.wall_seconds for t in moved),
        **{k: phases[k] - phases_before[k] for k in ("signalled_page_outs", "prefetches", "kept", "failed")},
        "growth_page_outs": engine.memory.growth_page_outs - growth_before,
        "meaning": "page-ins include prefetches (off the agent's path) and admissions (on it); wall_seconds is "
                   "the wall time of the page-outs and page-ins (the memory lock is released while the bytes move); "
                   "growth_page_outs were made from the step loop for a run that outgrew its reservation",
    }


def step_stats(engine: Engine) -> dict[str, float]:
    """The fast path's step loop counters (scheduler.py), summed over the engine's models."""
    totals: dict[str, float] = {}
    for loaded in engine._models.values():
        if loaded.scheduler is not None:
            for key, value in loaded.scheduler.stats().items():
                totals[key] = totals.get(key, 0) + value
    return totals


def steps_delta(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """What the step loop did during a cell: where a round's time went when it grew with the agent count
    (slower steps, more prefills between them, or a loop left idle)."""
    d = {key: after.get(key, 0) - before.get(key, 0) for key in ("decode_steps", "decode_seconds", "prefills",
                                                                  "prefill_seconds")}
    rows = after.get("mean_rows_per_step", 0) * after.get("decode_steps", 0) \
        - before.get("mean_rows_per_step", 0) * before.get("decode_steps", 0)
    return {**d, "rows_per_decode_step": rows / d["decode_steps"] if d["decode_steps"] else None,
            "ms_per_decode_step": 1e3 * d["decode_seconds"] / d["decode_steps"] if d["decode_steps"] else None,
            "ms_per_prefill": 1e3 * d["prefill_seconds"] / d["prefills"] if d["prefills"] else None,
            "busy_fraction": (d["decode_seconds"] + d["prefill_seconds"]) / wall_s if wall_s else None}


def pooled(cells: list[dict], rows: list[dict], policy: str, count: int, target_s: float) -> dict:
    """A count's figure over all its repeats: every cell complete, and the p99 of all their rounds together."""
    mine = [c for c in cells if c["policy"] == policy and c["agents"] == count]
    lat = [r["latency_s"] for r in rows if r["policy"] == policy and r["agents"] == count and r["error"] is None]
    p99 = quantile(lat, 0.99)
    complete = all(c["completed_rounds"] == c["expected_rounds"] for c in mine)
    return {"policy": policy, "agents": count, "repeats": len(mine), "rounds": len(lat), "p99_s": p99,
            "meets_target": bool(mine and complete and p99 is not None and p99 <= target_s)}


def max_at_target(counts: list[dict], policy: str) -> dict:
    """The largest count that met the target (pooled over its repeats), with every smaller tested count meeting it
    too. Where the sweep starts above one agent, one agent counts as met: the uncontended run that sets the target
    is that point."""
    mine = sorted((c for c in counts if c["policy"] == policy), key=lambda c: c["agents"])
    best, bounded = (0 if mine and mine[0]["agents"] == 1 else 1), False
    for entry in mine:
        if not entry["meets_target"]:
            bounded = True
            break
        best = entry["agents"]
    return {"agents": best, "bounded_by_sweep": not bounded}


def ratio(a: int, b: int) -> float | None:
    return None if b == 0 else a / b


class Results:
    """The result JSON, rewritten after every step so a cut-off run still leaves what it measured."""

    def __init__(self, path: str | None, base: dict) -> None:
        self.path = path
        self.data = {**base, "complete": False}

    def write(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def make_engine(device: torch.device, budget: int, host: int, reserve: int, deterministic: bool) -> Engine:
    memory = MemoryManager(device, budget, host, make_policy("hold"), chunk_bytes=min(GiB, host), host_reserve=reserve)
    memory.transfers = deque()  # every transfer of the run, for per-cell swap figures
    return Engine(device=device, memory=memory, deterministic=deterministic)


def without_waits(script: AgentScript) -> AgentScript:
    """The same agent with 1% of its tool waits: alone under hold nothing pages, so the wait does not change
    its rounds, and the uncontended figure and the warm-up take seconds instead of minutes."""
    steps = tuple(replace(s, tool_s=None if s.tool_s is None else s.tool_s / 100) for s in script.steps)
    return replace(script, steps=steps)


def uncontended(engine: Engine, model: Model, agent_scripts: list[AgentScript], cfg: Config) -> dict:
    engine.memory.policy = make_policy("hold")
    records: list[RoundRecord] = []
    for script in agent_scripts:
        outcome = run_agents(engine, model, [script], [0.0], cfg.cell_timeout_s)
        records += outcome["agents"][0]["records"]
    lat = [r.latency_s for r in records if r.error is None]
    return {"agents": len(agent_scripts), "rounds": len(lat), "p50_s": quantile(lat, 0.5), "p99_s": quantile(lat, 0.99),
            "continuation_p50_s": quantile([r.latency_s for r in records if r.index > 0], 0.5),
            "first_round_p50_s": quantile([r.latency_s for r in records if r.index == 0], 0.5)}


def sweep(engine: Engine, model: Model, cfg: Config, seed: int, vocab: int, target_s: float, results: Results,
          cuda: bool, until: int | None, policies: tuple[str, ...], todo: list[int]) -> bool:
    """``policies`` at the counts ``todo`` (those a resumed run has not done; every count where an extension adds
    policies), up to ``until``; True when no count is left."""
    cells, rows, done = results.data["cells"], results.data["rounds"], results.data["counts_done"]
    misses = {p: 0 for p in policies}
    for entry in sorted(results.data["counts"], key=lambda c: c["agents"]):
        if entry["policy"] in misses:
            misses[entry["policy"]] = 0 if entry["meets_target"] else misses[entry["policy"]] + 1
    pool = scripts(seed, max(cfg.counts), vocab, cfg.prompt_tokens, rounds=cfg.rounds, new_tokens=cfg.new_tokens,
                   tool_s=cfg.tool_s, result_tokens=cfg.result_tokens)
    for count in todo:
        if until is not None and count > until:
            log(f"left open before {count} agents (--until {until}): continue with --resume")
            return False
        for repeat in range(cfg.repeats):
            if time.monotonic() - START > cfg.deadline_s:
                if until is not None:  # a run in parts: the next part goes on from here
                    log(f"left open at the deadline ({cfg.deadline_s:.0f} s) before {count} agents: continue with "
                        f"--resume")
                    return False
                results.data["sweep_cut_off"] = f"deadline {cfg.deadline_s:.0f} s reached before {count} agents"
                log(results.data["sweep_cut_off"])
                return True
            offsets = poisson_offsets(random.Random(seed + count + 1000 * repeat), count, count / cfg.arrival_rate)
            for policy in policies:
                if misses[policy] < 2:
                    cell(engine, model, pool[:count], offsets, policy, repeat, target_s, results, cfg, cuda)
            if cfg.control:
                cell(engine, model, pool[:count], offsets, CONTROL, repeat, target_s, results, cfg, cuda)
        for policy in policies:
            if misses[policy] < 2:
                entry = pooled(cells, rows, policy, count, target_s)
                results.data["counts"].append(entry)
                misses[policy] = 0 if entry["meets_target"] else misses[policy] + 1
        if count not in done:
            done.append(count)
        results.data["parts"][-1]["counts"].append(count)
        results.write()
    return True


def cell(engine: Engine, model: Model, agents: list[AgentScript], offsets: list[float], policy: str, repeat: int,
         target_s: float, results: Results, cfg: Config, cuda: bool) -> None:
    """One cell: the agents under one policy, summarized into ``results`` (cells and per-round rows)."""
    count = len(agents)
    engine.memory.policy = make_policy("hold" if policy == CONTROL else policy)
    budget = engine.memory.budget
    if policy == CONTROL:
        engine.memory.budget = max(budget, int(1.25 * count * results.data["memory"]["agent_peak_kv_bytes"]))
    try:
        _cell(engine, model, agents, offsets, policy, repeat, target_s, results, cfg, cuda)
    finally:
        engine.memory.budget = budget


def _cell(engine: Engine, model: Model, agents: list[AgentScript], offsets: list[float], policy: str, repeat: int,
          target_s: float, results: Results, cfg: Config, cuda: bool) -> None:
    count = len(agents)
    n_transfers, phases_before = len(engine.memory.transfers), engine.phases.stats()
    growth_before = engine.memory.growth_page_outs
    steps_before = step_stats(engine)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    outcome = run_agents(engine, model, agents, offsets, cfg.cell_timeout_s)
    engine.phases.wait_idle(30)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    summary = summarize(policy, count, outcome, count * cfg.rounds, target_s,
                     swap_stats(engine, n_transfers, phases_before, growth_before), peak, engine.memory.budget)
    summary["repeat"] = repeat
    summary["steps"] = steps_delta(steps_before, step_stats(engine), outcome["wall_s"])
    rows = round_rows(policy, count, outcome)
    slowest = sorted(rows, key=lambda row: row["latency_s"], reverse=True)[: max(len(rows) // 100, 1)]
    summary["time_split"] = {"all_rounds": time_split(rows), "slowest_1_percent": time_split(slowest)}
    results.data["cells"].append(summary)
    results.data["rounds"] += [{**row, "repeat": repeat} for row in rows]
    lat = summary["latency_s"]
    log(f"{policy:>17} x{count:<3} rounds {summary['completed_rounds']}/{summary['expected_rounds']} "
        f"p50 {lat['p50'] or 0:.3f} p99 {lat['p99'] or 0:.3f} s (target {target_s:.3f}) "
        f"queued {summary['queueing']['seconds']:.2f} s, outs {summary['swap']['page_outs']} ins "
        f"{summary['swap']['page_ins']} swap {summary['swap']['wall_seconds']:.3f} s, peak KV "
        f"{summary['peak_vram']['session_kv_bytes_sampled'] / GiB:.2f} GiB; steps {summary['steps']}; "
        f"slowest rounds' time {summary['time_split']['slowest_1_percent']}"
        f"{' STOPPED: ' + summary['stopped'] if summary['stopped'] else ''}")
    results.write()


def exactness(device: torch.device, cfg: Config, seed: int, small: bool, results: Results,
              policies: tuple[str, ...]) -> None:
    """Each of ``policies`` with a few short agents at once on a budget of 1.5 agents, deterministic mode; every
    round's tokens against the same agent alone. An extension's policies join the run's check."""
    net, _ = build_model(small, device, seed, dtype=torch.float32 if small else torch.bfloat16)
    vocab = net.config.vocab_size
    c = cfg.check
    agent_scripts = scripts(seed + 7, c["agents"], vocab, c["prompt_tokens"], rounds=c["rounds"],
                            new_tokens=c["new_tokens"], tool_s=c["tool_s"], result_tokens=c["result_tokens"])
    engine = make_engine(device, 1 << 50, 8 * GiB if not small else 256 * MiB, 0, deterministic=True)
    model = Model(engine, engine.register_model(MODEL + "-check", net))
    per_token = model.info["kv_bytes_per_token"]
    reference = []
    for script in agent_scripts:
        outcome = run_agents(engine, model, [script], [0.0], cfg.cell_timeout_s)
        reference.append([r.tokens for r in outcome["agents"][0]["records"]])
    peak = per_token * max(script_tokens(s) for s in agent_scripts)
    room = admission_room(engine, MODEL + "-check", agent_scripts, fast=False)
    budgets = {p: int(1.5 * peak) + room for p in policies}
    if "hold" in budgets:  # hold never pages: checked for concurrency alone
        budgets["hold"] = int((len(agent_scripts) + 1) * peak) + room
    check = results.data.get("exactness_check") or {"agents": len(agent_scripts), "budget_bytes": {}, "policies": {}}
    check["budget_bytes"].update(budgets)
    for policy in policies:
        engine.memory.policy = make_policy(policy)
        engine.memory.budget = budgets[policy]
        outs_before = engine.memory.page_outs
        outcome = run_agents(engine, model, agent_scripts, [0.0] * len(agent_scripts), cfg.cell_timeout_s)
        engine.phases.wait_idle(30)
        mine = {"corrupted_rounds": 0, "failed_rounds": 0, "rounds_checked": 0,
                "page_outs": engine.memory.page_outs - outs_before, "stopped": outcome["stopped"]}
        for agent, ref in zip(outcome["agents"], reference):
            got = {r.index: r for r in agent["records"]}
            for index, tokens in enumerate(ref):
                r = got.get(index)
                if r is None or r.error is not None:  # a check agent is never stopped short: a missing round failed
                    mine["failed_rounds"] += 1
                    continue
                mine["rounds_checked"] += 1
                mine["corrupted_rounds"] += r.tokens != tokens
        check["policies"][policy] = mine
        log(f"exactness {policy}: {mine}")
    engine.shutdown()
    check.update({key: sum(mine[key] for mine in check["policies"].values())
                  for key in ("corrupted_rounds", "failed_rounds", "rounds_checked")})
    results.data["exactness_check"] = check
    results.write()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for policy in results["config"]["policies"]:
        counts = sorted((c for c in results["counts"] if c["policy"] == policy and c["p99_s"] is not None),
                        key=lambda c: c["agents"])
        ax.plot([c["agents"] for c in counts], [c["p99_s"] for c in counts], marker="o", label=policy)
    control = sorted((c for c in results["cells"] if c["policy"] == CONTROL and c["latency_s"]["p99"] is not None),
                     key=lambda c: c["agents"])
    if control:
        ax.plot([c["agents"] for c in control], [c["latency_s"]["p99"] for c in control], color="black",
                linestyle=":", marker="x", label=f"{CONTROL} (compute alone)")
    ax.axhline(results["target_s"], color="grey", linestyle="--", label="target: 2 x uncontended p99")
    ax.set_xlabel("concurrent agents")
    ax.set_ylabel("p99 round latency (s)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"Experiment 1: {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resumed(path: str, out: str, base: dict) -> Results:
    """The open run in ``path``, to continue. Its mode, seed and config must be this run's (the counts too: the
    budget is counted from the largest agent); cells of a count it did not finish are dropped, and that count runs
    again, so every count's cells come from one process."""
    data = json.loads(Path(path).read_text())
    if data.get("complete"):
        raise SystemExit(f"{path} is a complete run: nothing to resume")
    if "counts_done" not in data or "target_s" not in data:
        raise SystemExit(f"{path} cannot be resumed (written before its target was measured, or by an older "
                         f"script): start a new run")

    differs = options_differ(data, base, ignore={"deadline_s"})
    if differs:
        raise SystemExit(f"{path} was run with other options ({', '.join(differs)}): resume with the same ones")
    done = set(data["counts_done"])
    data["cells"] = [c for c in data["cells"] if c["agents"] in done]
    data["rounds"] = [r for r in data["rounds"] if r["agents"] in done]
    log(f"resuming {path}: counts done {sorted(done)}, target {data['target_s']:.3f} s")
    return Results(out, data)


def extended(path: str, out: str, base: dict, policies: tuple[str, ...]) -> Results:
    """The complete run in ``path``, to sweep ``policies`` too with its counts, agents, arrival times and target.
    Its mode, seed and config must be this run's but for the policies and the control cells (which do not depend
    on the policy, so an extension does not run them again)."""
    data = json.loads(Path(path).read_text())
    if not data.get("complete"):
        raise SystemExit(f"{path} is an open run: finish it with --resume before extending it")
    already = sorted(set(policies) & set(data["config"]["policies"]))
    if already:
        raise SystemExit(f"{path} has swept {', '.join(already)} already: extend it with other policies")
    differs = options_differ(data, base, ignore={"deadline_s", "policies", "control"})
    if differs:
        raise SystemExit(f"{path} was run with other options ({', '.join(differs)}): extend it with the same ones")
    data["config"]["policies"] = [p for p in POLICIES if p in data["config"]["policies"] or p in policies]
    data["definitions"] = base["definitions"]
    log(f"extending {path} with {', '.join(policies)}: counts {data['counts_done']}, target {data['target_s']:.3f} s")
    return Results(out, data)


def options_differ(data: dict, base: dict, ignore: set[str]) -> list[str]:
    """The options (mode, seed, config keys but ``ignore``) in which a run's JSON differs from this run's."""
    def comparable(config: dict) -> dict:
        return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in ignore}

    differs = sorted(k for k in {"mode", "seed"} if data.get(k) != base[k])
    mine, theirs = comparable(base["config"]), comparable(data["config"])
    return differs + sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="result JSON (rewritten as the run goes)")
    ap.add_argument("--small", action="store_true", help="tiny fp32 model on the CPU: a smoke test (< 1 minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--counts", default=None, help="agent counts to sweep, e.g. 12,16,20 (default: the config's)")
    ap.add_argument("--repeats", type=int, default=None, help="cells per count and policy (default 1)")
    ap.add_argument("--arrival-rate", type=float, default=None, help="agents arriving per second (default 8)")
    ap.add_argument("--no-control", action="store_true",
                    help=f"skip the {CONTROL} cell at each count (hold with room for every agent: compute alone)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds of script time after which no cell starts")
    ap.add_argument("--policies", default=None,
                    help=f"policies to sweep, e.g. hold,lru,signal (default all: {','.join(POLICIES)}); the density "
                         f"ratios need hold, lru and a signal-driven one (others are a diagnosis: no ratios)")
    ap.add_argument("--until", type=int, default=None,
                    help="sweep the counts up to this one, then leave the run open (no exactness check) for --resume; "
                         "a run given --until also stays open when --deadline cuts it")
    ap.add_argument("--resume", default=None, metavar="JSON",
                    help="continue the open run in JSON (same options): its target, the counts it has not done, "
                         "then the exactness check; --out defaults to JSON")
    ap.add_argument("--extend", default=None, metavar="JSON",
                    help="sweep the policies given by --policies (any not in it) on the complete run in JSON (same "
                         "options) with its counts, agents and target; check them, and summarize over all its "
                         "policies; --out defaults to JSON")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    small = args.small
    cuda = not small
    if cuda and not torch.cuda.is_available():
        log("CUDA is not available: run on the GPU machine, or pass --small for the CPU smoke test")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    cfg = Config.make(small)
    if args.counts:
        cfg = replace(cfg, counts=tuple(int(c) for c in args.counts.split(",")))
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.arrival_rate:
        cfg = replace(cfg, arrival_rate=args.arrival_rate)
    if args.deadline:
        cfg = replace(cfg, deadline_s=args.deadline)
    if args.no_control:
        cfg = replace(cfg, control=False)
    if args.extend and (args.resume or args.until or not args.policies):
        log("--extend takes --policies (those to add) and neither --resume nor --until: an extension runs in one part")
        return 2
    if args.policies:
        chosen = tuple(p for p in POLICIES if p in args.policies.split(","))
        unknown = set(args.policies.split(",")) - set(POLICIES)
        if unknown or not chosen:
            log(f"--policies {args.policies}: choose among {', '.join(POLICIES)} (the density ratios need hold, lru "
                f"and at least one of {', '.join(SIGNAL_DRIVEN)})")
            return 2
        cfg = replace(cfg, policies=chosen)
    import transformers

    header = {
        "experiment": "issue 10, experiment 1: agent density at a latency target (experiments/exp1_agents/run.py)",
        "mode": "small" if small else "full",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "cuda": torch.version.cuda,
                        "nvidia_smi": nvidia_smi() if cuda else None},
        "config": {**asdict(cfg), "tool_wait_distribution": f"uniform {cfg.tool_s[0]}-{cfg.tool_s[1]} s",
                   "tool_waits": "uniform 1-10 s: the issue's example is 2-20 s; halved so that the sweep (5 "
                                 "counts x 4 policies, each cell as long as its slowest agent) fits one 10-minute "
                                 "device call. Alone under hold an agent's rounds do not depend on its waits, so "
                                 "the uncontended target is measured with 1% of them" if not small else "smoke test",
                   "hints": "oracle: io_wait's expected_s is the tool call's real duration",
                   "arrivals": f"Poisson, {cfg.arrival_rate:g} agents/s at every count (n agents arrive over "
                               f"about n / {cfg.arrival_rate:g} s)",
                   "model_choice": "Llama-2-7B shape instead of 13B: building, warming up and sweeping 13B does not "
                                   "fit the time box" if not small else "tiny Llama, fp32, CPU"},
        "definitions": {
            "round_latency": "wall time of one generate call of a round (queueing for memory included), from the "
                             "agent's request to the run's end",
            "target_s": "2 x the p99 round latency of the same kind of agents run one at a time under hold",
            "max_agents_at_target": "the largest agent count whose cells (all repeats) completed every round with "
                                    "the p99 of their rounds pooled <= target, all smaller counts meeting it too "
                                    "(0: none did; see counts); max_agents_bounded_by_sweep: "
                                    "no tested count missed, so the true figure may be larger",
            "density_ratio_vs_hold / _vs_lru": "the better signal-driven policy's max_agents_at_target / hold's "
                                               "(lru's); per policy in density_ratios",
            "corrupted_rounds": "rounds whose tokens differ from the same agent run alone (deterministic engine)",
            "failed_rounds": "rounds that raised or did not finish, in the sweep and in the exactness check",
            "parts": "the processes that ran the sweep (one, or more with --until and --resume, or --extend): each "
                     "one's date, machine, counts, policies, and (after the first) its own uncontended pass; the "
                     "target is the first's",
        },
        "seed": args.seed, "cells": [], "rounds": [], "counts": [], "counts_done": [], "parts": [],
    }
    if args.resume:
        results = resumed(args.resume, args.out or args.resume, header)
    elif args.extend:
        results = extended(args.extend, args.out or args.extend, header, cfg.policies)
    else:
        results = Results(args.out, header)
    swept = cfg.policies
    if args.extend:
        cfg = replace(cfg, policies=tuple(results.data["config"]["policies"]), control=False)
    results.data["parts"].append({"date_utc": header["date_utc"], "environment": header["environment"], "counts": [],
                                  "policies": list(swept)})
    results.write()

    net, shape = build_model(small, device, args.seed, dtype=torch.float32 if small else torch.bfloat16)
    vocab = net.config.vocab_size
    results.data["model"] = shape
    log(f"model {shape['parameters'] / 1e9:.2f} B parameters on {device}")
    pool = scripts(args.seed, max(cfg.counts), vocab, cfg.prompt_tokens, rounds=cfg.rounds,
                   new_tokens=cfg.new_tokens, tool_s=cfg.tool_s, result_tokens=cfg.result_tokens)
    probe_per_token = 2 * net.config.num_hidden_layers * net.config.num_key_value_heads * (
        net.config.hidden_size // net.config.num_attention_heads) * next(net.parameters()).element_size()
    peak_tokens = max(script_tokens(s) for s in pool)
    budget = int(cfg.budget_agents * probe_per_token * peak_tokens)
    host = max(4 * budget, 64 * MiB) if small else 64 * GiB
    reserve = 0 if small else 24 * GiB  # the most the sweep pages at once, pinned before it starts
    t = time.monotonic()
    engine = make_engine(device, budget, host, reserve, deterministic=False)
    pinned_s = time.monotonic() - t
    model = Model(engine, engine.register_model(MODEL, net))
    # An agent's peak as admission counts it: the fast path reserves a round's KV in whole blocks (kv_blocks.py).
    agent_peak = engine._model(MODEL).kv_bytes(peak_tokens, engine.fast)
    budget = int(cfg.budget_agents * agent_peak)
    log(f"engine: session budget {budget / GiB:.2f} GiB = {cfg.budget_agents} agents' peak KV "
        f"({agent_peak / GiB:.3f} GiB); host pool {reserve / GiB:.0f} GiB pinned in {pinned_s:.1f} s")
    prompt_room = admission_room(engine, MODEL, pool, fast=True)
    budget = engine.memory.budget = budget + prompt_room
    log(f"plus {prompt_room / GiB:.3f} GiB: the activations of the longest prompt, which admission reserves with its KV")
    memory = {"session_budget_bytes": budget, "agent_peak_kv_bytes": agent_peak, "prompt_activation_bytes": prompt_room,
              "kv_bytes_per_token": model.info["kv_bytes_per_token"], "hold_capacity_agents": cfg.budget_agents,
              "fast_path": model.info["fast_path"]}
    if (args.resume or args.extend) and memory != results.data["memory"]:
        raise SystemExit(f"the memory set-up differs from the resumed run's ({memory} against "
                         f"{results.data['memory']}): resume with the same options, on the same kind of GPU")
    results.data["memory"] = memory
    log(f"registered (fast path {model.info['fast_path']}); warming up with one agent")
    run_agents(engine, model, [without_waits(pool[0])], [0.0], cfg.cell_timeout_s)

    alone = [without_waits(s) for s in pool[: cfg.uncontended_agents]]
    cold = uncontended(engine, model, alone, cfg)
    base = uncontended(engine, model, alone, cfg)
    log(f"uncontended, first pass (new prompt lengths compile kernels): {cold}")
    if args.resume or args.extend:
        target_s = results.data["target_s"]
        results.data["parts"][-1].update(uncontended_cold=cold, uncontended=base)
        log(f"uncontended here: {base}; the run's target {target_s:.3f} s (its uncontended p99 "
            f"{results.data['uncontended']['p99_s']:.3f} s against {base['p99_s']:.3f} s here)")
    else:
        target_s = 2 * base["p99_s"]
        results.data.update(uncontended_cold=cold, uncontended=base, target_s=target_s)
        log(f"uncontended: {base}; target p99 <= {target_s:.3f} s")
    results.write()

    todo = list(cfg.counts) if args.extend else [c for c in cfg.counts if c not in results.data["counts_done"]]
    finished = sweep(engine, model, cfg, args.seed, vocab, target_s, results, cuda, args.until, swept, todo)
    engine.shutdown()
    del engine, model, net
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if not finished:
        return 0

    exactness(device, cfg, args.seed, small, results, swept)

    data = results.data
    found = {p: max_at_target(data["counts"], p) for p in cfg.policies}
    best = {p: found[p]["agents"] for p in cfg.policies}
    signal_driven = [p for p in SIGNAL_DRIVEN if p in cfg.policies]
    compared = bool(signal_driven) and {"hold", "lru"} <= set(cfg.policies)  # else a diagnosis of some policies
    signal_best = max((best[p] for p in signal_driven), default=0)
    check = data["exactness_check"]
    data.update(
        max_agents_at_target=best,
        max_agents_bounded_by_sweep={p: found[p]["bounded_by_sweep"] for p in cfg.policies},
        density_ratio_vs_hold=ratio(signal_best, best["hold"]) if compared else None,
        density_ratio_vs_lru=ratio(signal_best, best["lru"]) if compared else None,
        density_ratios={p: {"vs_hold": ratio(best[p], best["hold"]), "vs_lru": ratio(best[p], best["lru"])}
                        for p in signal_driven} if compared else None,
        corrupted_rounds=check["corrupted_rounds"],
        failed_rounds=check["failed_rounds"] + sum(c["failed_rounds"] for c in data["cells"]),
        hold_queued_or_out_of_memory=[
            {"agents": c["agents"], "queueing": c["queueing"], "stopped": c["stopped"]}
            for c in data["cells"] if c["policy"] == "hold" and (c["queueing"]["admission_refusals"] or c["stopped"])],
        targets={"density_ratio_vs_hold": ">= 2", "density_ratio_vs_lru": "> 1",
                 "corrupted_rounds": "0", "failed_rounds": "0"},
        complete=True,
        script_seconds=time.monotonic() - START,
    )
    results.write()
    if args.out and importlib.util.find_spec("matplotlib") is not None:
        plot(data, Path(args.out).with_suffix(".png"))
    log(f"max agents at target {best}; density vs hold {data['density_ratio_vs_hold']}, vs lru "
        f"{data['density_ratio_vs_lru']}; corrupted {data['corrupted_rounds']}, failed {data['failed_rounds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
