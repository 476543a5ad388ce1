"""Weight streaming (streaming.py): the ring's bookkeeping on its own, and a streamed model against the same
model fully resident (bitwise: tokens and logits), in-process and through a daemon, with breakpoints, steering,
edits and paging. On the CPU the ring runs the same code with host slots, synchronous copies and complete
events, so these tests check the order of loads, the reuse rule and the byte counts of the real thing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import djinn_kernel as dj
from conftest import PROMPT, make_engine
from djinn_kernel.builtin import build_builtin
from djinn_kernel.engine import Engine
from djinn_kernel.report import format_status
from djinn_kernel.streaming import WeightRing, packed_bytes, plan_for, plan_split, stream_model

ROOT = Path(__file__).resolve().parent.parent
N = 8  # new tokens per run: a prefill and seven decode forwards


# the plan ------------------------------------------------------------------------------------------------
def test_a_model_that_fits_is_not_streamed():
    assert plan_split([100] * 4, 50, 450) is None


def test_the_last_layers_stay_resident_and_the_ring_takes_the_first():
    plan = plan_split([100] * 10, 50, 50 + 5 * 100 + 2 * 100)
    assert plan.resident == (5, 6, 7, 8, 9) and plan.streamed == (0, 1, 2, 3, 4)
    assert plan.slots == 2 and plan.slot_bytes == 100 and plan.arena_bytes == 500
    assert plan.device_bytes == 50 + 700


def test_a_tight_budget_gets_one_slot_and_an_impossible_one_a_clear_error():
    assert plan_split([100] * 4, 50, 160).slots == 1
    with pytest.raises(dj.WeightBudgetError, match="--weight-memory"):
        plan_split([100] * 4, 50, 149)
    with pytest.raises(dj.WeightBudgetError, match="no decoder-layer list"):
        plan_split([], 500, 100)
    with pytest.raises(dj.InvalidArgumentError, match="ring_slots"):
        plan_split([100] * 4, 50, 200, slots=0)


# the ring on a stack of linear layers ----------------------------------------------------------------------
class Stack(nn.Module):
    """Twelve layers: module order 0..11, where sorted names would put "layers.10" before "layers.2"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def streamed_stack(resident: int = 1, slots: int = 3) -> tuple[Stack, WeightRing, torch.Tensor, torch.Tensor]:
    """The stack with its last ``resident`` layers kept, an input and the output it gives fully resident."""
    net = Stack()
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = net(x)
    layer = packed_bytes(net.layers[0])
    other = sum(p.numel() * 4 for p in net.embed.parameters())
    plan = plan_for(net, list(net.layers), other + (resident + slots) * layer, slots)
    assert plan.resident == tuple(range(12 - resident, 12)) and plan.slots == slots
    ring = stream_model(net, [f"layers.{i}" for i in range(12)], plan, torch.device("cpu"))
    return net, ring, x, expected


def check_reuse_rule(log) -> None:
    """Replay the log: a slot is loaded only when no acquire of its current layer lacks its release."""
    readers: dict[int, int] = {}
    for event in log:
        if event.kind == "load":
            assert readers.get(event.slot, 0) == 0, f"slot {event.slot} reloaded while a forward read it"
        elif event.kind == "acquire":
            readers[event.slot] = readers.get(event.slot, 0) + 1
        else:
            readers[event.slot] -= 1


def test_every_forward_loads_in_module_order_round_the_ring_and_is_exact():
    net, ring, x, expected = streamed_stack()
    layer = packed_bytes(net.layers[0])
    with torch.no_grad():
        outs = [net(x) for _ in range(4)]
    assert all(torch.equal(out, expected) for out in outs), "streamed weights compute exactly what resident ones do"
    loads = [(e.layer, e.slot) for e in ring.log if e.kind == "load"]
    # Streamed positions 0..10 are layers 0..10 ("layers.10" after "layers.9"), cyclic; every third load per slot.
    assert ring.paths == [f"layers.{i}" for i in range(11)]
    assert [layer for layer, _ in loads] == [i % 11 for i in range(len(loads))]
    assert [slot for _, slot in loads] == [i % 3 for i in range(len(loads))]
    acquires = [e.layer for e in ring.log if e.kind == "acquire"]
    assert acquires == list(range(11)) * 4 and ring.demand_loads == 0
    assert list(ring.per_forward) == [11 * layer] * 4, "every forward copies each streamed layer once"
    assert ring.bytes_copied == ring.loads * layer
    check_reuse_rule(ring.log)


def test_outside_a_forward_a_streamed_layer_shows_its_own_weights():
    net, ring, x, _ = streamed_stack()
    before = net.layers[5].weight.clone()
    with torch.no_grad():
        net(x)
    assert torch.equal(net.layers[5].weight, before)
    assert net.layers[5].weight.untyped_storage().data_ptr() == ring.arena.untyped_storage().data_ptr()


def test_a_layer_held_by_a_paused_forward_keeps_its_slot_while_others_run():
    """A forward stopped inside streamed layer 2 (a breakpoint on a submodule) holds its slot; another forward
    runs through the rest of the ring meanwhile, and the held layer's weights are intact when it goes on."""
    net, ring, x, expected = streamed_stack()
    entered, go, held = threading.Event(), threading.Event(), {}

    def paused_inside() -> None:
        ring.acquire(2)
        held["weight"] = net.layers[2].weight
        entered.set()
        go.wait()
        held["after"] = net.layers[2].weight.clone()
        ring.release(2)

    other = threading.Thread(target=paused_inside)
    other.start()
    entered.wait()
    slot = next(s for s in ring.slots if s.layer == 2)
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    assert slot.layer == 2 and slot.readers == 1, "the held slot was never reloaded"
    go.set()
    other.join()
    assert torch.equal(held["after"], ring._arena_views[2][0]), "the paused forward still reads layer 2"
    check_reuse_rule(ring.log)


def test_a_forward_that_dies_inside_a_layer_gives_its_slot_back():
    net, ring, x, expected = streamed_stack(slots=2)
    ring.acquire(0)  # the forward's hook ran, then the layer raised: no release
    assert sum(s.readers for s in ring.slots) == 1
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out, expected) and sum(s.readers for s in ring.slots) == 0
    check_reuse_rule(ring.log)


def test_a_forward_cut_short_is_followed_by_an_exact_one():
    net, ring, x, expected = streamed_stack()
    for k in range(3):  # a forward cancelled after three streamed layers: the ring prefetched for a fourth
        ring.acquire(k)
        ring.release(k)
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    assert ring.demand_loads == 1, "the next forward's first layer was no longer in the ring"
    assert ring.per_forward[-1] == 11 * packed_bytes(net.layers[0])
    check_reuse_rule(ring.log)


# a streamed model served by the engine -----------------------------------------------------------------------
def streaming_budget(name: str, resident: int, slots: int = 2) -> int:
    """The weight budget that keeps ``resident`` decoder layers of a built-in model plus ``slots`` ring slots."""
    net, _, _ = build_builtin(name)
    layers = net.model.layers if name == "tiny-llama" else net.transformer.h
    other = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    other -= sum(p.numel() * p.element_size() for p in layers.parameters())
    return other + (resident + slots) * packed_bytes(layers[0])


@pytest.fixture(scope="module")
def streamed():
    made: list[Engine] = []

    def get(name: str, resident_layers: int = 1) -> dj.Model:
        engine = make_engine(weight_memory=streaming_budget(name, resident_layers))
        made.append(engine)
        return dj.load(name, backend=engine)

    yield get
    for engine in made:
        engine.shutdown()


def run_of(model: dj.Model) -> tuple[list[int], torch.Tensor]:
    with model.session() as s:
        run = s.generate(PROMPT, N, keep_logits=True)
        assert run.state == "finished"
        return run.tokens, run.logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_streamed_model_is_bitwise_the_resident_one(name, backends, streamed):
    model = streamed(name)
    info = model.info["streaming"]
    assert info["resident_layers"] == [3] and info["streamed_layers"] == [0, 1, 2] and info["ring_slots"] == 2
    assert model.info["fast_path"] == "off", "a deterministic engine: the module path (batched: test_streaming_batched)"
    tokens, logits = run_of(model)
    ref_tokens, ref_logits = run_of(dj.load(name, backend=backends("inprocess")))
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)


@pytest.mark.inprocess
def test_status_reports_the_split_and_the_bytes_of_each_token(streamed):
    model = streamed("tiny-llama")
    engine = model._backend
    ring = engine._model("tiny-llama").ring
    run_of(model)
    stats = engine.status()["models"][0]["streaming"]
    assert stats["bytes_per_token"] == ring.plan.arena_bytes and stats["forwards"] >= N
    assert list(ring.per_forward)[-N:] == [ring.plan.arena_bytes] * N, "every forward, not just the first"
    assert "3 streamed through 2 ring slots" in format_status(engine.status())


def test_breakpoints_edits_and_the_lens_on_streamed_layers(backends, streamed):
    model, reference_model = streamed("tiny-llama"), dj.load("tiny-llama", backend=backends("inprocess"))
    tokens, logits = run_of(reference_model)
    results = {}
    for which, m in (("streamed", model), ("resident", reference_model)):
        with m.session() as s:
            s.break_at(2)
            s.break_at("model.layers.2.mlp", side="input", tokens=2)
            run = s.generate(PROMPT, N, keep_logits=True)
            stops, lens, acts = [], [], []
            while run.paused:
                stops.append((run.pause.path, run.pause.token_step))
                acts.append(run.pause.activation)
                if run.pause.layer == 2:
                    lens.append(run.pause.logit_lens(k=3))
                    if run.pause.token_step == 1:
                        run.pause.scale(1.5)
                run.resume()
            results[which] = (stops, lens, acts, run.tokens, run.logits)
    (stops, lens, acts, got, got_logits), (ref_stops, ref_lens, ref_acts, ref, ref_logits) = results.values()
    assert stops == ref_stops and ("model.layers.2.mlp", 2) in stops and lens == ref_lens
    assert all(torch.equal(a, b) for a, b in zip(acts, ref_acts))
    assert got == ref and torch.equal(got_logits, ref_logits)
    assert not torch.equal(got_logits, logits), "the edit at token step 1 took effect"


@pytest.mark.inprocess
@pytest.mark.parametrize("side", ["input", "output"])
def test_a_pause_at_a_streamed_layer_holds_no_slot(side, streamed):
    """The ring's hooks run inside the debugger's: a pause at the layer itself waits with every slot free."""
    model = streamed("tiny-llama")
    ring = model._backend._model("tiny-llama").ring
    with model.session() as s:
        s.break_at(2, side=side)
        run = s.generate(PROMPT, 3)
        while run.paused:
            assert [slot.readers for slot in ring.slots] == [0, 0]
            run.resume()
        assert run.state == "finished"


def test_steering_a_streamed_layer_equals_steering_the_resident_one(backends, streamed):
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3))
    outcome = []
    for m in (streamed("tiny-llama"), dj.load("tiny-llama", backend=backends("inprocess"))):
        with m.session() as s:
            s.steer(1, vector, alpha=4.0)
            run = s.generate(PROMPT, N, keep_logits=True)
            outcome.append((run.tokens, run.logits))
    assert outcome[0][0] == outcome[1][0] and torch.equal(outcome[0][1], outcome[1][1])


@pytest.mark.inprocess
def test_a_session_paused_inside_a_streamed_layer_and_paged_leaves_others_exact(backends, streamed):
    """One session waits inside layer 2's MLP (its ring slot held) and is paged out and back; another
    session runs to the end meanwhile through the rest of the ring; both equal the resident model."""
    model = streamed("tiny-llama")
    tokens, logits = run_of(dj.load("tiny-llama", backend=backends("inprocess")))
    with model.session() as held, model.session() as other:
        held.break_at("model.layers.2.mlp", tokens=3)
        run = held.generate(PROMPT, N, keep_logits=True)
        assert run.paused and run.pause.token_step == 3
        ring = model._backend._model("tiny-llama").ring
        assert [(slot.layer, slot.readers) for slot in ring.slots if slot.readers] == [(2, 1)], "layer 2 is held"
        assert held.page_out()["bytes"] > 0 and held.status()["state"] == "paged"
        mine = other.generate(PROMPT, N, keep_logits=True)
        assert mine.tokens == tokens and torch.equal(mine.logits, logits)
        held.page_in()
        run.resume()
        assert run.tokens == tokens and torch.equal(run.logits, logits)


@pytest.mark.inprocess
def test_sessions_decoding_at_once_share_the_ring_and_stay_exact(backends, streamed):
    """Four sessions on four threads at once: more forwards than slots, so some wait for a slot to free."""
    model = streamed("tiny-llama")
    tokens, logits = run_of(dj.load("tiny-llama", backend=backends("inprocess")))
    results: list[tuple[list[int], torch.Tensor]] = []
    threads = [threading.Thread(target=lambda: results.append(run_of(model))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert all(got == tokens and torch.equal(got_logits, logits) for got, got_logits in results)
    check_reuse_rule(model._backend._model("tiny-llama").ring.log)


def test_an_impossible_budget_is_refused_at_load_with_what_to_do():
    engine = make_engine(weight_memory=1000)
    try:
        with pytest.raises(dj.WeightBudgetError, match=r"raise --weight-memory .* to at least"):
            dj.load("tiny-llama", backend=engine)
        assert engine.models() == []
    finally:
        engine.shutdown()
    with pytest.raises(dj.InvalidArgumentError, match="ring_slots"):
        Engine(device="cpu", weight_memory="1GiB", ring_slots=0)


# through the daemon ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon():
    from daemon_util import DaemonProcess

    process = DaemonProcess("--weight-memory", str(streaming_budget("tiny-llama", 1)))
    yield process
    process.stop()


def test_through_the_daemon_a_streamed_model_is_exact_pauses_and_reports(daemon, backends):
    client = daemon.client()
    model = dj.load("tiny-llama", backend=client)
    assert model.info["streaming"]["streamed_layers"] == [0, 1, 2]
    tokens, logits = run_of(dj.load("tiny-llama", backend=backends("inprocess")))
    got, got_logits = run_of(model)
    assert got == tokens and torch.equal(got_logits, logits)
    with model.session() as s:
        s.break_at(2, tokens=1)
        run = s.generate(PROMPT, N, keep_logits=True)
        assert run.paused and run.pause.layer == 2
        s.page_out()
        run.resume()
        assert run.tokens == tokens and torch.equal(run.logits, logits)
    stats = client.status()["models"][0]["streaming"]
    assert stats["bytes_per_token"] == stats["arena_bytes"]


def test_through_the_daemon_an_impossible_budget_raises_the_same_error():
    from daemon_util import DaemonProcess

    process = DaemonProcess("--weight-memory", "1000")
    try:
        with pytest.raises(dj.WeightBudgetError, match="--weight-memory"):
            dj.load("tiny-gpt2", backend=process.client())
    finally:
        process.stop()


# the experiment's CPU mode --------------------------------------------------------------------------------
def test_the_experiment_runs_small_on_the_cpu(tmp_path):
    out = tmp_path / "exp2.json"
    env_path = f"{ROOT}:{ROOT / 'experiments'}"
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "exp2_streaming" / "run.py"), "--small", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["exact_vs_resident"]["logits_bitwise"] and result["paused_session"]["exact"]
    assert result["djinn_bytes_streamed_per_token"] == result["streamed_bytes"] > 0
    batched = result["batched_8_sessions"]
    assert batched["fast_path"] == "on" and batched["bytes_per_step_equal_streamed_bytes"]
    assert batched["sessions_8"]["rows_per_step"] > 1, "the eight sessions shared steps"
    plot = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "exp2_streaming" / "plot.py"), str(out), str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert plot.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0, plot.stderr[-2000:]
