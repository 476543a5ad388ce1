"""A model split by layer across two engines (split.py): the first layers on a stage engine, the rest and the
sessions on the host. Here both engines are in this process (``EngineStage``); tests/test_cluster_daemon.py runs
the same split over Ray engine actors through a daemon."""

from __future__ import annotations

import pytest
import torch

import djinn_kernel as dj
from djinn_kernel.builtin import build_builtin
from djinn_kernel.edits import AddVector, Scale
from djinn_kernel.engine import Engine
from djinn_kernel.errors import InvalidArgumentError, InvalidTargetError
from djinn_kernel.split import EngineStage, RemoteLayer

SPLIT_AT = 2  # tiny-llama has 4 decoder layers: 0-1 on the stage, 2-3 on the host


@pytest.fixture
def engines():
    whole, host, stage = (Engine(device="cpu", deterministic=True) for _ in range(3))
    yield whole, host, stage
    for engine in (host, stage, whole):
        engine.shutdown()


def models(whole: Engine, host: Engine, stage: Engine) -> tuple[dj.Model, dj.Model]:
    plain = dj.load("tiny-llama", backend=whole)
    stage.serve_stage("tiny-llama", SPLIT_AT)
    info = host.serve_split("tiny-llama", SPLIT_AT, EngineStage(stage, "tiny-llama:layers0-1"))
    return plain, dj.Model(host, info)


def started(engines) -> list[dj.Session]:
    """A session of the whole model and one of the split, each after the same first run."""
    sessions = [m.session() for m in models(*engines)]
    for s in sessions:
        s.generate("Hello, world", 4)
    return sessions


def test_the_host_holds_only_its_layers_and_the_stage_only_its_own(engines):
    whole, host, stage = engines
    plain, split = models(whole, host, stage)
    assert split.info["id"] == "tiny-llama:split2" and split.info["fast_path"] == "off"
    layers = host._model("tiny-llama:split2").model.model.layers
    assert [type(layer) is RemoteLayer for layer in layers] == [True, True, False, False]
    served = stage._model("tiny-llama:layers0-1").model.model.layers
    assert [sum(p.numel() for p in layer.parameters()) > 0 for layer in served] == [True, True, False, False]
    per_layer = sum(p.numel() for p in layers[2].parameters()) * 4
    assert plain.info["weight_bytes"] - split.info["weight_bytes"] == 2 * per_layer


def test_a_split_model_gives_the_whole_models_tokens_logits_and_paused_activations(engines):
    """Pauses at a stage layer and at a host layer, with edits there, across the prompt and decode steps, then a
    continuation, a rewind and a fresh run: bitwise what the unsplit model gives."""
    whole, host, stage = engines
    plain, split = models(whole, host, stage)
    sessions = [m.session() for m in (plain, split)]
    first = [s.generate("Hello, world", 6, keep_logits=True) for s in sessions]
    assert first[0].tokens == first[1].tokens and torch.equal(first[0].logits, first[1].logits)
    for s in sessions:
        s.break_at(1, tokens=1)  # layer 1 runs on the stage
        s.break_at(3, tokens=0)  # layer 3 on the host
    runs = [s.generate(" and then", 5, fresh=False, keep_logits=True) for s in sessions]
    seen = []
    vector = torch.full((64,), 0.05)
    while runs[0].state == "paused":
        assert runs[1].state == "paused" and runs[0].pause.info == runs[1].pause.info
        assert torch.equal(runs[0].pause.activation, runs[1].pause.activation)
        seen.append((runs[0].pause.layer, runs[0].pause.token_step))
        for run in runs:
            run.pause.apply(AddVector(vector, 2.0) if run.pause.layer == 1 else Scale(1.5))
            run.resume()
    assert seen == [(3, 0), (1, 1)] and runs[1].state == runs[0].state == "finished"
    assert runs[0].tokens == runs[1].tokens and torch.equal(runs[0].logits, runs[1].logits)
    for s in sessions:
        s.delete()
        s.rewind(15)
    again = [s.generate(" or", 4, fresh=False, keep_logits=True) for s in sessions]
    assert again[0].tokens == again[1].tokens and torch.equal(again[0].logits, again[1].logits)
    fresh = [s.generate("Bye", 4, keep_logits=True) for s in sessions]
    assert fresh[0].tokens == fresh[1].tokens and torch.equal(fresh[0].logits, fresh[1].logits)


class CountingStage(EngineStage):
    """The in-process stage, with the layer stretches each call ran."""

    def __init__(self, engine: Engine, model_id: str) -> None:
        super().__init__(engine, model_id)
        self.calls: list[tuple[int, int]] = []

    def run(self, sid, first, last, *args):
        self.calls.append((first, last))
        return super().run(sid, first, last, *args)


def test_remote_layers_share_one_call_unless_the_run_watches_between_them(engines):
    """Layers 0-1 on the stage: one call per forward, except where a breakpoint could fire at layer 0's output
    (token step 1 here), which needs layer 0's own output, so that forward calls once per layer; tokens as the
    whole model's either way."""
    whole, host, stage = engines
    plain = dj.load("tiny-llama", backend=whole)
    stage.serve_stage("tiny-llama", SPLIT_AT)
    counting = CountingStage(stage, "tiny-llama:layers0-1")
    split = dj.Model(host, host.serve_split("tiny-llama", SPLIT_AT, counting))
    sessions = [m.session() for m in (plain, split)]
    first = [s.generate("Hello", 4) for s in sessions]
    assert counting.calls == [(0, 1)] * 4 and first[0].tokens == first[1].tokens
    counting.calls.clear()
    for s in sessions:
        s.break_at(0, tokens=1)
    runs = [s.generate("Hello", 4) for s in sessions]
    assert torch.equal(runs[0].pause.activation, runs[1].pause.activation)
    for run in runs:
        run.finish()
    assert counting.calls == [(0, 1), (0, 0), (1, 1), (0, 1), (0, 1)] and runs[0].tokens == runs[1].tokens
    for s in sessions:  # back to the length the last forward started from: a new forward, a new stretch
        s.delete()
        s.rewind(s.status()["history_tokens"] - 2)
    again = [s.generate("!", 3, fresh=False, keep_logits=True) for s in sessions]
    assert again[0].tokens == again[1].tokens and torch.equal(again[0].logits, again[1].logits)


def test_paging_both_halves_out_while_paused_loses_nothing(engines):
    """A paused split session's KV lives on two engines: each pages its own out and back, bit for bit."""
    _, host, stage = engines
    sessions = started(engines)
    for s in sessions:
        s.break_at(2, tokens=2)
    runs = [s.generate(" and", 5, fresh=False, keep_logits=True) for s in sessions]
    stage_sid = host._session(sessions[1].id).stage
    assert host.page_out(sessions[1].id)["paged"] and stage.page_out(stage_sid)["paged"]
    assert stage.describe_session(stage_sid)["memory"]["gpu_bytes"] == 0
    for run in runs:
        run.finish()
    assert runs[0].tokens == runs[1].tokens and torch.equal(runs[0].logits, runs[1].logits)


def test_a_fork_of_a_split_session_forks_its_half_on_the_stage(engines):
    """The fork and the original continue alike, each with its own KV on both engines, as the whole model's."""
    originals = started(engines)
    forks = [s.fork() for s in originals]
    assert len(engines[2].sessions()) == 2
    again = [s.generate(" and", 4, fresh=False, keep_logits=True) for s in (*originals, *forks)]
    assert all(r.tokens == again[0].tokens and torch.equal(r.logits, again[0].logits) for r in again)
    forks[1].rewind(3)
    assert forks[1].generate(" or", 3, fresh=False).tokens == forks[0].rewind(3).generate(" or", 3, fresh=False).tokens
    assert originals[1].generate(" so", 3, fresh=False).tokens == originals[0].generate(" so", 3, fresh=False).tokens


def test_kv_and_attention_of_a_stage_layer_are_refused_at_a_pause_and_the_hosts_are_served(engines):
    """A pause on the host can read and edit the KV of the host's layers and the attention of a host layer; the
    stage's layers' KV is not here, so those are refused, saying where it is."""
    sessions = started(engines)
    for s in sessions:
        s.break_at(0, tokens=1)  # its output feeds layer 1, on the stage
        s.break_at(1, tokens=1)  # its output feeds layer 2, on the host
    whole, split = (s.generate(" and", 4, fresh=False) for s in sessions)
    with pytest.raises(InvalidTargetError, match="decoder layer 0 runs on another engine of this split model"):
        split.pause.kv(0)
    with pytest.raises(InvalidTargetError, match="decoder layer 1 runs on .* which holds its keys and values"):
        split.pause.edit_kv(1, [0], keys=torch.zeros(2, 1, 16))
    with pytest.raises(InvalidTargetError, match="decoder layer 1 runs on .* which holds the attention"):
        split.pause.attention()
    for run in (whole, split):
        run.resume()
    assert split.pause.layer == whole.pause.layer == 1
    for mine, theirs in zip(split.pause.kv(3), whole.pause.kv(3)):
        assert torch.equal(mine, theirs)
    assert torch.equal(split.pause.attention(), whole.pause.attention())
    for run in (whole, split):
        run.finish()
    assert whole.tokens == split.tokens


def test_closing_a_split_session_closes_its_half_on_the_stage(engines):
    whole, host, stage = engines
    _, split = models(whole, host, stage)
    session = split.session()
    session.generate("Hello", 3)
    assert [s["owner"] for s in stage.sessions()] == ["split"]
    session.close()
    assert stage.sessions() == []


def test_what_a_split_cannot_do_yet_is_refused_clearly(engines):
    whole, host, stage = engines
    _, split = models(whole, host, stage)
    session = split.session()
    session.generate("Hello", 3)
    with pytest.raises(InvalidArgumentError, match="cannot be moved to another engine yet"):
        host.export_session(session.id)
    with pytest.raises(InvalidArgumentError, match="no other can serve part of the layers"):
        dj.load("tiny-llama", split_at=2, backend=whole)
    with pytest.raises(InvalidArgumentError, match="split_at must be a layer index from 1 to 3"):
        stage.serve_stage("tiny-llama", 4)
    with pytest.raises(InvalidArgumentError, match="splitting is built for Llama-family models"):
        stage.serve_stage("tiny-gpt2", 1)
    with pytest.raises(InvalidTargetError, match="inside model.layers.0, which runs on another engine of this split"):
        session.break_at("model.layers.0.mlp")  # inside a layer that runs on the stage
    net = build_builtin("tiny-llama")[0]
    with pytest.raises(InvalidArgumentError, match="contiguous, non-empty range"):
        host.register_split("other", net, range(0, 4, 2), EngineStage(stage, "tiny-llama:layers0-1"))
