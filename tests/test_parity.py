"""Bad input gets the same clear error in-process and through the daemon, and changes nothing (issue 13).

Each case of ``CASES`` is one call on a fresh session of tiny-llama (some at a pause of a run of that session);
the same ``DjinnError`` subclass, exactly, is expected in both modes. After it the session's breakpoints and
steering are as before, a paused run's activation is bit for bit the same and it finishes with the reference
tokens, the session still generates them, and a bystander session paused in the same backend for the whole
module finishes with them too. ``FORGED`` adds what only the wire can carry: signed requests built by hand,
sent to the daemon (decoded, then refused by its dispatcher or the engine); ``tests/test_security.py`` has the
table of messages the decoder itself refuses. ``docs/reliability.md`` counts the cases.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import djinn_kernel as dj
from daemon_util import RawPeer, forge, request, tensor
from djinn_kernel.errors import ERRORS_BY_NAME
from djinn_kernel.protocol import MsgType

KINDS = ["inprocess", "daemon"]
PROMPT = list(range(5, 17))
HIDDEN = 64  # tiny-llama's width
V = torch.ones(HIDDEN)


@dataclass(frozen=True)
class Bad:
    error: type[dj.DjinnError]
    call: Callable[..., object]  # (model, session), or (model, session, run) with ``at_pause``
    at_pause: bool = False  # called while a run of the session is paused at layer 1, token step 2


def arg(error: type[dj.DjinnError], call: Callable[[dj.Model, dj.Session], object]) -> Bad:
    return Bad(error, call)


def at_pause(error: type[dj.DjinnError], call: Callable[[dj.Model, dj.Session, dj.Run], object]) -> Bad:
    return Bad(error, call, at_pause=True)


IAE, ITE, ITA, MNF = dj.InvalidArgumentError, dj.InvalidTensorError, dj.InvalidTargetError, dj.ModelNotFoundError

CASES: dict[str, Bad] = {
    # generate: types, ranges, the context length, the prompt
    "seed of the wrong type": arg(IAE, lambda m, s: s.generate(PROMPT, 2, seed="7")),
    "a float seed": arg(IAE, lambda m, s: s.generate(PROMPT, 2, seed=1.5)),
    "a None seed": arg(IAE, lambda m, s: s.generate(PROMPT, 2, seed=None)),
    "a bool seed": arg(IAE, lambda m, s: s.generate(PROMPT, 2, seed=True)),
    "chat not a bool": arg(IAE, lambda m, s: s.generate(PROMPT, 2, chat="yes")),
    "keep_logits not a bool": arg(IAE, lambda m, s: s.generate(PROMPT, 2, keep_logits="no")),
    "fresh not a bool": arg(IAE, lambda m, s: s.generate(PROMPT, 2, fresh="yes")),
    "max_new_tokens 0": arg(IAE, lambda m, s: s.generate(PROMPT, 0)),
    "max_new_tokens a float": arg(IAE, lambda m, s: s.generate(PROMPT, 1.5)),
    "max_new_tokens a string": arg(IAE, lambda m, s: s.generate(PROMPT, "3")),
    "max_new_tokens a bool": arg(IAE, lambda m, s: s.generate(PROMPT, True)),
    "max_new_tokens None": arg(IAE, lambda m, s: s.generate(PROMPT, None)),
    "max_new_tokens beyond the context": arg(IAE, lambda m, s: s.generate(PROMPT, 10**9)),
    "a prompt beyond the context": arg(IAE, lambda m, s: s.generate([5] * 300, 2)),
    "an empty prompt": arg(IAE, lambda m, s: s.generate([], 2)),
    "an empty text prompt": arg(IAE, lambda m, s: s.generate("", 2)),
    "a negative prompt id": arg(IAE, lambda m, s: s.generate([-1, 5], 2)),
    "a prompt id past the vocabulary": arg(IAE, lambda m, s: s.generate([100], 2)),
    "a huge prompt id": arg(IAE, lambda m, s: s.generate([10**12], 2)),
    "a float prompt id": arg(IAE, lambda m, s: s.generate([1.5], 2)),
    "a bool prompt id": arg(IAE, lambda m, s: s.generate([True], 2)),
    "a nested prompt": arg(IAE, lambda m, s: s.generate([[5]], 2)),
    "a None prompt": arg(IAE, lambda m, s: s.generate(None, 2)),
    "an int prompt": arg(IAE, lambda m, s: s.generate(5, 2)),
    "a tensor prompt": arg(IAE, lambda m, s: s.generate(torch.tensor(PROMPT), 2)),
    "a lone surrogate in the prompt": arg(IAE, lambda m, s: s.generate("caf\ud800", 2)),
    "a lone surrogate in a continued prompt": arg(
        IAE, lambda m, s: (s.generate(PROMPT, 2), s.generate("caf\ud800", 2, fresh=False))
    ),
    "chat=True without a chat template": arg(IAE, lambda m, s: s.generate("hello", 2, chat=True)),
    "a negative temperature": arg(IAE, lambda m, s: s.generate(PROMPT, 2, temperature=-1)),
    "a NaN temperature": arg(IAE, lambda m, s: s.generate(PROMPT, 2, temperature=float("nan"))),
    "an infinite temperature": arg(IAE, lambda m, s: s.generate(PROMPT, 2, temperature=float("inf"))),
    "a text temperature": arg(IAE, lambda m, s: s.generate(PROMPT, 2, temperature="hot")),
    "top_k 0": arg(IAE, lambda m, s: s.generate(PROMPT, 2, top_k=0)),
    "a float top_k": arg(IAE, lambda m, s: s.generate(PROMPT, 2, top_k=1.5)),
    "a bool top_k": arg(IAE, lambda m, s: s.generate(PROMPT, 2, top_k=True)),
    # breakpoints
    "a layer past the last": arg(ITA, lambda m, s: s.break_at(99)),
    "a layer before the first": arg(ITA, lambda m, s: s.break_at(-99)),
    "a module path that does not exist": arg(ITA, lambda m, s: s.break_at("model.no_such")),
    "a float target": arg(ITA, lambda m, s: s.break_at(1.5)),
    "a None target": arg(ITA, lambda m, s: s.break_at(None)),
    "a bool target": arg(ITA, lambda m, s: s.break_at(True)),
    "a side that does not exist": arg(IAE, lambda m, s: s.break_at(1, side="middle")),
    "a superscript digit in tokens": arg(IAE, lambda m, s: s.break_at(1, tokens="²")),
    "a stepped token range": arg(IAE, lambda m, s: s.break_at(1, tokens=range(0, 4, 2))),
    "a bool in a token pair": arg(IAE, lambda m, s: s.break_at(1, tokens=(True, 3))),
    "a negative token step": arg(IAE, lambda m, s: s.break_at(1, tokens=-1)),
    "tokens not a range": arg(IAE, lambda m, s: s.break_at(1, tokens="abc")),
    "a reversed token pair": arg(IAE, lambda m, s: s.break_at(1, tokens=(3, 1))),
    "a token triple": arg(IAE, lambda m, s: s.break_at(1, tokens=(1, 2, 3))),
    "a float token step": arg(IAE, lambda m, s: s.break_at(1, tokens=1.5)),
    "max_hits 0": arg(IAE, lambda m, s: s.break_at(1, max_hits=0)),
    "negative max_hits": arg(IAE, lambda m, s: s.break_at(1, max_hits=-1)),
    "max_hits a string": arg(IAE, lambda m, s: s.break_at(1, max_hits="2")),
    "a condition that does not parse": arg(IAE, lambda m, s: s.break_at(1, when="norm >>> 3")),
    "a condition that is code": arg(IAE, lambda m, s: s.break_at(1, when="__import__('os')")),
    "a condition not text": arg(IAE, lambda m, s: s.break_at(1, when=5)),
    "a condition naming several tokens": arg(IAE, lambda m, s: s.break_at(1, when="token == 'zzqqxx'")),
    "a condition naming a lone surrogate": arg(IAE, lambda m, s: s.break_at(1, when="token == '\ud800'")),
    "deleting a breakpoint that does not exist": arg(IAE, lambda m, s: s.delete(999)),
    # steering and recording
    "a steering vector too short": arg(ITE, lambda m, s: s.steer(1, torch.ones(3))),
    "a steering vector of NaN": arg(ITE, lambda m, s: s.steer(1, torch.full((HIDDEN,), float("nan")))),
    "a steering vector of Inf": arg(ITE, lambda m, s: s.steer(1, torch.full((HIDDEN,), float("inf")))),
    "a 2-D steering vector": arg(ITE, lambda m, s: s.steer(1, torch.ones(2, HIDDEN))),
    "an integer steering vector": arg(ITE, lambda m, s: s.steer(1, torch.ones(HIDDEN, dtype=torch.int64))),
    "a steering vector as a list": arg(ITE, lambda m, s: s.steer(1, [1.0] * HIDDEN)),
    "a NaN steering alpha": arg(IAE, lambda m, s: s.steer(1, V, float("nan"))),
    "a text steering alpha": arg(IAE, lambda m, s: s.steer(1, V, "x")),
    "steering a layer that does not exist": arg(ITA, lambda m, s: s.steer(99, V)),
    "steering a side that does not exist": arg(IAE, lambda m, s: s.steer(1, V, side="middle")),
    "removing steering that does not exist": arg(IAE, lambda m, s: s.unsteer(999)),
    "recording a layer that does not exist": arg(ITA, lambda m, s: s.record(99)),
    "recording positions not a list": arg(IAE, lambda m, s: s.record(1, positions="abc")),
    "removing a recording that does not exist": arg(IAE, lambda m, s: s.unrecord(999)),
    # conversation, runs, waiting
    "rewinding by a negative count": arg(IAE, lambda m, s: s.rewind(-1)),
    "rewinding by text": arg(IAE, lambda m, s: s.rewind("2")),
    "rewinding past the start": arg(IAE, lambda m, s: s.rewind(10**6)),
    "resuming with no run": arg(dj.NotPausedError, lambda m, s: m._backend.resume(s.id, "continue")),
    "resuming a finished run": arg(dj.RunFinishedError, lambda m, s: s.generate(PROMPT, 2).resume()),
    "a NaN timeout": arg(IAE, lambda m, s: s.generate(PROMPT, 2).wait(timeout=float("nan"))),
    "a text timeout": arg(IAE, lambda m, s: s.generate(PROMPT, 2).wait(timeout="abc")),
    "a negative timeout": arg(IAE, lambda m, s: s.generate(PROMPT, 2).wait(timeout=-1)),
    "an infinite timeout": arg(IAE, lambda m, s: s.generate(PROMPT, 2).wait(timeout=float("inf"))),
    "a negative tool-call estimate": arg(IAE, lambda m, s: s.io_wait(-1)),
    "a NaN tool-call estimate": arg(IAE, lambda m, s: s.io_wait(float("nan"))),
    # the model: tokens, loading
    "a negative token id": arg(IAE, lambda m, s: m.token_strings([-1])),
    "a huge token id": arg(IAE, lambda m, s: m.token_strings([10**12])),
    "token ids as text": arg(IAE, lambda m, s: m.token_strings("abc")),
    "a float token id": arg(IAE, lambda m, s: m.token_strings([1.5])),
    "a nested token id": arg(IAE, lambda m, s: m.token_strings([[1]])),
    "a bool token id": arg(IAE, lambda m, s: m.token_strings([True])),
    "tokenizing an int": arg(IAE, lambda m, s: m.tokenize(5)),
    "tokenizing a lone surrogate": arg(IAE, lambda m, s: m.tokenize("a\ud800")),
    "a garbage dtype": arg(IAE, lambda m, s: dj.load("tiny-llama", dtype="float13", backend=m._backend)),
    "an int dtype": arg(IAE, lambda m, s: dj.load("tiny-llama", dtype=16, backend=m._backend)),
    "an empty model name": arg(MNF, lambda m, s: dj.load("", backend=m._backend)),
    "a model that is not here": arg(MNF, lambda m, s: dj.load("no-such-model-x", backend=m._backend)),
    "an int model name": arg(MNF, lambda m, s: dj.load(5, backend=m._backend)),
    "detaching an SAE never attached": arg(IAE, lambda m, s: s.detach_sae(1)),
    "steering a feature with no SAE": arg(IAE, lambda m, s: s.steer_feature(1, 3)),
    # at a pause: every refused edit leaves the activation and the run as they were
    "a second run while one is paused": at_pause(dj.SessionBusyError, lambda m, s, r: s.generate(PROMPT, 2)),
    "a resume mode that does not exist": at_pause(IAE, lambda m, s, r: m._backend.resume(s.id, "sideways")),
    "a resume mode that is a list": at_pause(IAE, lambda m, s, r: m._backend.resume(s.id, [])),
    "a NaN scale": at_pause(IAE, lambda m, s, r: r.pause.scale(float("nan"))),
    "a text scale": at_pause(IAE, lambda m, s, r: r.pause.scale("2")),
    "adding a vector too short": at_pause(ITE, lambda m, s, r: r.pause.add(torch.ones(3))),
    "a replacement of the wrong shape": at_pause(ITE, lambda m, s, r: r.pause.replace(torch.ones(1, 1, 3))),
    "a replacement of NaN": at_pause(ITE, lambda m, s, r: r.pause.replace(torch.full(r.pause.shape, float("nan")))),
    "setting a position past the end": at_pause(IAE, lambda m, s, r: r.pause.set([999], torch.ones(1, HIDDEN))),
    "setting a position before the start": at_pause(IAE, lambda m, s, r: r.pause.set([-999], torch.ones(1, HIDDEN))),
    "ablating the zero vector": at_pause(ITE, lambda m, s, r: r.pause.ablate(torch.zeros(HIDDEN))),
    "ablating a direction too short": at_pause(ITE, lambda m, s, r: r.pause.ablate(torch.ones(3))),
    "a logit lens of k=0": at_pause(IAE, lambda m, s, r: r.pause.logit_lens(k=0)),
    "a logit lens past the positions": at_pause(IAE, lambda m, s, r: r.pause.logit_lens(position=999)),
    "the KV of a layer that does not exist": at_pause(ITA, lambda m, s, r: r.pause.kv(99)),
    "KV keys of the wrong shape": at_pause(ITE, lambda m, s, r: r.pause.edit_kv(0, [0], keys=torch.ones(3))),
    "features with no SAE": at_pause(IAE, lambda m, s, r: r.pause.features()),
}


@pytest.fixture(scope="module")
def reference(backends):
    with dj.load("tiny-llama", backend=backends("inprocess")).session() as s:
        return s.generate(PROMPT, 6).tokens


def paused_run(s: dj.Session) -> dj.Run:
    s.break_at(1, tokens=2)
    run = s.generate(PROMPT, 6)
    assert run.paused
    return run


@pytest.fixture(scope="module")
def bystander(backends, reference):
    """``bystander(kind)``: a session of that backend paused for the whole module; it must finish unchanged."""
    runs: dict[str, tuple[dj.Session, dj.Run]] = {}

    def get(kind: str) -> dj.Session:
        if kind not in runs:
            s = dj.load("tiny-llama", backend=backends(kind)).session()
            runs[kind] = s, paused_run(s)
        return runs[kind][0]

    yield get
    for s, run in runs.values():
        assert run.finish().tokens == reference, "another session's bad input changed nothing here"
        s.close()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_refused_alike_and_changes_nothing(kind, case, backends, reference, bystander):
    bad = CASES[case]
    bystander(kind)
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        run = paused_run(s) if bad.at_pause else None
        before = s.breakpoints, s.steering, None if run is None else run.pause.activation
        with pytest.raises(bad.error) as refused:
            bad.call(model, s, run) if bad.at_pause else bad.call(model, s)
        assert type(refused.value) is bad.error, "the same class in both modes, not a subclass"
        assert (s.breakpoints, s.steering) == before[:2]
        if run is not None:
            assert torch.equal(run.pause.activation, before[2]), "a refused edit changed nothing"
            assert run.finish().tokens == reference
        else:
            assert s.generate(PROMPT, 6).tokens == reference


# wire-level: requests the client library never sends, signed with the daemon's key ----------------------------


@dataclass(frozen=True)
class Forged:
    error: type[dj.DjinnError]
    op: object
    args: object  # with "sid" standing for the bystander's session (another client's)
    buffers: tuple[bytes, ...] = ()


OTHER = "sid"  # placeholder for a session id that belongs to another client
F32 = tensor(shape=(4,))

FORGED: dict[str, Forged] = {
    "another client's session, described": Forged(dj.SessionClosedError, "describe_session", {"sid": OTHER}),
    "another client's session, resumed": Forged(dj.SessionClosedError, "resume", {"sid": OTHER, "mode": "continue"}),
    "another client's session, closed": Forged(dj.SessionClosedError, "close_session", {"sid": OTHER}),
    "another client's session, paged out": Forged(dj.SessionClosedError, "page_out", {"sid": OTHER}),
    "another client's session, read": Forged(dj.SessionClosedError, "activation", {"sid": OTHER, "original": True}),
    "another client's session, edited": Forged(
        dj.SessionClosedError, "edit", {"sid": OTHER, "edit": {"__edit__": "scale", "fields": {"factor": 0.0}}}
    ),
    "another client's session, forked": Forged(dj.SessionClosedError, "fork", {"sid": OTHER}),
    "a session id that is a bool": Forged(dj.SessionClosedError, "describe_session", {"sid": True}),
    "a session id that is text": Forged(dj.SessionClosedError, "describe_session", {"sid": "1"}),
    "a session id that is a float": Forged(dj.SessionClosedError, "describe_session", {"sid": 1.0}),
    "a session id past int64": Forged(dj.SessionClosedError, "describe_session", {"sid": 2**70}),
    "an op that does not exist": Forged(IAE, "eval_python", {}),
    "an op that is not text": Forged(IAE, 5, {}),
    "no op": Forged(IAE, None, {}),
    "arguments that are a list": Forged(IAE, "status", []),
    "an argument that does not exist": Forged(IAE, "status", {"verbose": True}),
    "a required argument missing": Forged(IAE, "tokenize", {"model_id": "tiny-llama"}),
    "a model id that is not loaded": Forged(MNF, "module_paths", {"model_id": "not-loaded"}),
    "token ids as a tensor": Forged(IAE, "token_strings", {"model_id": "tiny-llama", "token_ids": F32}, (bytes(16),)),
    "an edit kind that does not exist": Forged(IAE, "status", {"e": {"__edit__": "explode", "fields": {}}}),
    "an edit field that does not exist": Forged(
        IAE, "status", {"e": {"__edit__": "scale", "fields": {"factor": 2.0, "color": 1}}}
    ),
    "a range of step 0": Forged(dj.ProtocolError, "status", {"r": {"__range__": [0, 4, 0]}}),
    "a range of floats": Forged(dj.ProtocolError, "status", {"r": {"__range__": [0, 4.5, 1]}}),
    "shutdown with arguments": Forged(IAE, "shutdown", {"now": True}),
}


@pytest.fixture(scope="module")
def peer(backends):
    client = backends("daemon")
    p = RawPeer(client.endpoint, client._key)
    yield p
    p.close()


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_request_is_refused_and_changes_nothing(case, backends, bystander, peer):
    """From a client id of its own, as another kernel would send it; the bystander session is another client's."""
    forged = FORGED[case]
    other = bystander("daemon")
    args = forged.args
    if isinstance(args, dict):
        args = {k: other.id if v == OTHER else v for k, v in args.items()}
    addressed = request(backends("daemon").daemon["instance"], 1, client=uuid.uuid4().hex)
    header = {**addressed, "op": forged.op, "args": args}
    kind, reply = peer.ask(forge(peer.key, header, *forged.buffers))
    assert kind is MsgType.ERROR and ERRORS_BY_NAME[reply["error"]["type"]] is forged.error, reply
    assert "internal error" not in reply["error"]["message"]
    assert other.status()["state"] == "paused", "the bystander is still there, still paused"

def replaced_tokens(backend, expanded: bool) -> list[int]:
    with dj.load("tiny-llama", backend=backend).session() as s:
        s.break_at(1, tokens=0)  # the prefill: [1, tokens, hidden], so the expanded row has stride 0 over tokens
        run = s.generate(PROMPT, 6)
        row = run.pause.activation[..., -1:, :]
        run.pause.replace(row.expand(run.pause.shape) if expanded else row.expand(run.pause.shape).contiguous())
        return run.finish().tokens


def test_an_expanded_replacement_acts_alike_in_both_modes(backends):
    tokens = {kind: replaced_tokens(backends(kind), True) for kind in KINDS}
    assert tokens["inprocess"] == tokens["daemon"] == replaced_tokens(backends("inprocess"), False)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dtype_asked_for_is_the_dtype_served(kind, backends):
    model = dj.load("tiny-gpt2", dtype="bfloat16", backend=backends(kind))
    assert model.info["dtype"] == "bfloat16"
    with model.session() as s:
        assert len(s.generate(PROMPT, 3).tokens) == 3
