"""Generated messages against the wire decoder and the daemon's dispatcher (issue 13): no crash, ever.

Every outcome must be a decoded message or a ``DjinnError`` (the decoder), an answer or a ``DjinnError`` that is not
"internal error in the daemon" (the dispatcher, in-process and through a running daemon), and the daemon must
serve a paused bystander session unchanged afterwards. Hypothesis draws the messages with a fixed seed
(``derandomize``) and a small budget in CI; ``DJINN_LONG=1`` runs more examples, randomly seeded (figures in
``docs/reliability.md``).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import djinn_kernel as dj
from conftest import LONG, PROMPT, make_engine, scaled
from daemon_util import DaemonProcess, RawPeer, forge, request
from djinn_kernel.daemon import Client, Daemon, Security
from djinn_kernel.edits import AddVector, Scale, SetPositions
from djinn_kernel.errors import ERRORS_BY_NAME, DjinnError
from djinn_kernel.protocol import DTYPES, OPS, MsgType, decode, encode

KEY = b"f" * 64


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# values ------------------------------------------------------------------------------------------------------
INTS = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63, -(2**63), 10**12, 10**30]))
FLOATS = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "0-3", "norm > 1", "token == ' a'", "\ud800", "²"]))
NAMES = st.sampled_from(["tiny-llama", "tiny-gpt2", "nope", "", "../etc", "model.layers.1", "input", "output"])
SHAPES = st.lists(st.integers(0, 5), max_size=3)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(n for n in DTYPES if not n.startswith("float8"))))]
    shape = draw(st.one_of(SHAPES, st.just([64]), st.just([1, 12, 64])))
    return (torch.randn(shape) * draw(st.sampled_from([0.0, 1.0, math.nan]))).to(dtype)


EDITS = st.one_of(
    st.builds(Scale, FLOATS),
    st.builds(AddVector, tensors(), FLOATS),
    st.builds(SetPositions, st.lists(INTS, max_size=3).map(tuple), tensors()),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, NAMES)
VALUES = st.recursive(
    st.one_of(SCALARS, tensors(), EDITS),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def calls(draw: st.DrawFn, sids: list[int]) -> tuple[str, dict[str, Any]]:
    """An op and arguments named as it takes them (sometimes one it does not): what a client might send."""
    op = draw(st.sampled_from(sorted(set(OPS) - {"shutdown", "heartbeat", "goodbye"})))
    names = draw(st.lists(st.sampled_from(OPS[op] or ("x",)), unique=True, max_size=len(OPS[op])))
    args: dict[str, Any] = {}
    for name in names:
        if name == "sid":
            args[name] = draw(st.one_of(st.sampled_from(sids), INTS, SCALARS))
        elif name == "model_id":
            args[name] = draw(st.one_of(st.just("tiny-llama"), NAMES, SCALARS))
        elif name == "prompt":
            args[name] = draw(st.one_of(st.just(PROMPT), st.lists(INTS, max_size=6), TEXT, VALUES))
        elif name == "max_new_tokens":
            args[name] = draw(st.one_of(st.integers(-1, 4), SCALARS))  # short runs: thousands fit in CI
        elif name in ("target", "layer"):
            args[name] = draw(st.one_of(st.integers(-5, 5), NAMES, SCALARS))
        else:
            args[name] = draw(VALUES)
    if draw(st.integers(0, 19)) == 0:
        args[draw(st.text(min_size=1, max_size=6))] = draw(VALUES)
    return op, args


# the decoder -------------------------------------------------------------------------------------------------
def check_decoded(frames: list[bytes]) -> None:
    try:
        kind, header = decode(frames, KEY)
    except DjinnError:
        return
    assert isinstance(kind, MsgType) and isinstance(header, dict)


@fuzz(scaled(1000, 20_000))
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames(frames):
    check_decoded(frames)


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False, allow_infinity=False), TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["__tensor__", "dtype", "shape", "__float__", "__range__", "__edit__",
                                         "fields", "v", "op", "args", "x"]), inner, max_size=4),
    ),
    max_leaves=12,
)


@fuzz(scaled(1000, 20_000))
@given(JSONISH, st.lists(st.binary(max_size=24), max_size=3), st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x07"]))
def test_signed_headers_of_tagged_json(body, buffers, kind):
    """Signed, so every one gets past the signature to the parser; tagged objects of every kind, mostly wrong."""
    header = {"v": 2, "x": body} if not isinstance(body, dict) or "v" not in body else body
    check_decoded(forge(KEY, json.dumps(header).encode(), *buffers, kind=kind))


@fuzz(scaled(300, 5_000))
@given(VALUES)
def test_every_value_the_encoder_takes_round_trips(value):
    frames = encode(MsgType.REQUEST, {"x": value}, KEY)
    _, header = decode(frames, KEY)
    assert same(header["x"], value)


def same(a: Any, b: Any) -> bool:
    """Equality as the wire keeps it: tensors bit for bit, tuples as lists, NaN equal to NaN."""
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
    if isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == {str(k) for k in b} and all(same(a[str(k)], v) for k, v in b.items())
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    if hasattr(b, "tensors"):  # an Edit
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in (*b.scalars(), *b.tensors()))
    return a == b and type(a) is type(b)


# the dispatcher ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dispatcher():
    """A daemon's dispatcher over a real engine, called directly (no sockets): a client owning two sessions,
    one paused, and a session of another client."""
    engine = make_engine()
    daemon = Daemon(engine, Security(KEY), [])
    mine, other = Client("client-1"), Client("client-2")
    dj.load("tiny-llama", backend=engine)
    reference = daemon._dispatch(mine, "open_session", {"model_id": "tiny-llama"})
    tokens = engine.generate(reference, PROMPT, 6)["tokens"]
    paused = daemon._dispatch(other, "open_session", {"model_id": "tiny-llama"})
    engine.add_breakpoint(paused, 1, tokens=2)
    engine.generate(paused, PROMPT, 6)
    sids = [reference, daemon._dispatch(mine, "open_session", {"model_id": "tiny-llama"}), paused]
    yield daemon, mine, sids
    assert engine.resume(paused, "finish")["tokens"] == tokens, "the other client's paused run is unchanged"
    daemon._pool.shutdown()
    daemon._ctx.term()
    engine.shutdown()


@fuzz(scaled(600, 10_000))
@given(st.data())
def test_the_dispatcher_answers_or_refuses(dispatcher, data):
    daemon, client, sids = dispatcher
    op, args = data.draw(calls(sids))
    try:
        daemon._dispatch(client, op, args)
    except DjinnError:
        pass
    client.sessions.intersection_update(sids[:2])  # sessions it opened are left to the engine; keep the fixture's


# through a running daemon ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess("--gpu-memory", "256KiB")  # small enough that paging and admission refusals come up
    client = d.client()
    model = dj.load("tiny-llama", backend=client)
    with model.session() as s:
        tokens = s.generate(PROMPT, 6).tokens
    bystander = model.session()
    bystander.break_at(1, tokens=2)
    run = bystander.generate(PROMPT, 6)
    peer = RawPeer(d.info.ipc, d.info.key())
    yield d, peer, client
    assert run.finish().tokens == tokens, "a session of another client came through unchanged"
    assert client.status()["daemon"]["pid"] == d.info.pid
    peer.close()
    d.stop()


@fuzz(scaled(300, 3_000))
@given(st.data())
def test_the_daemon_answers_every_request_and_goes_on(daemon, data):
    d, peer, client = daemon
    owner = uuid.uuid4().hex
    header = request(client.daemon["instance"], 1, client=owner)
    opened = {**header, "op": "open_session", "args": {"model_id": "tiny-llama"}}
    sid = peer.ask(encode(MsgType.REQUEST, opened, peer.key))[1]["result"]
    op, args = data.draw(calls([sid, *range(1, 4)]))
    kind, reply = peer.ask(encode(MsgType.REQUEST, {**header, "seq": 2, "id": 2, "op": op, "args": args}, peer.key))
    assert reply["id"] == 2
    if kind is MsgType.ERROR:
        assert reply["error"]["type"] in ERRORS_BY_NAME and "internal error" not in reply["error"]["message"], reply
    peer.ask(encode(MsgType.REQUEST, {**header, "seq": 3, "id": 3, "op": "goodbye", "args": {}}, peer.key))


@fuzz(scaled(300, 3_000))
@given(JSONISH, st.lists(st.binary(max_size=24), max_size=3))
def test_the_daemon_refuses_malformed_messages_and_goes_on(daemon, body, buffers):
    d, peer, client = daemon
    header = {**request(client.daemon["instance"], 1, client=uuid.uuid4().hex), "x": body}
    kind, reply = peer.ask(forge(peer.key, header, *buffers))
    if kind is MsgType.ERROR:
        assert reply["error"]["type"] in ERRORS_BY_NAME and "internal error" not in reply["error"]["message"], reply
