"""The wire format: every dtype bit for bit, signed frames, refusal of anything malformed."""

from __future__ import annotations

import json

import pytest
import torch

from djinn_kernel.edits import AddVector, Scale
from djinn_kernel.errors import InvalidArgumentError, InvalidTensorError, ProtocolError, SessionBusyError
from djinn_kernel.protocol import DTYPES, MsgType, bind_args, decode, encode, error_body, raise_error

KEY = b"k" * 32


def round_trip(header):
    return decode(encode(MsgType.REQUEST, header, KEY), KEY)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_bitwise(name):
    dtype = DTYPES[name]
    raw = torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tensor = raw.view(dtype) if dtype.itemsize == 1 else raw.reshape(3, 5, -1).view(dtype)
    if dtype == torch.bool:
        tensor = raw % 2 == 1
    _, header = round_trip({"x": tensor, "empty": torch.empty(0, 4, dtype=dtype), "scalar": tensor.flatten()[0]})
    assert header["x"].dtype == dtype and header["x"].shape == tensor.shape
    assert torch.equal(header["x"].view(torch.uint8), tensor.view(torch.uint8)), "bit for bit, NaN payloads too"
    assert header["empty"].shape == (0, 4) and header["scalar"].shape == ()


def test_non_contiguous_and_nested_values():
    t = torch.arange(24, dtype=torch.bfloat16).reshape(4, 6).t()
    _, header = round_trip({"a": [t, {"b": (1, 2.5, None, "s", True)}], "r": range(2, 6), "s": range(0, 9, 4)})
    assert torch.equal(header["a"][0], t) and header["a"][1]["b"] == [1, 2.5, None, "s", True]
    assert header["r"] == range(2, 6) and header["s"] == range(0, 9, 4), "ranges arrive as the same range"
    _, header = round_trip({"f": [float("nan"), float("inf"), -float("inf"), 1.5]})
    assert header["f"][0] != header["f"][0] and header["f"][1:] == [float("inf"), -float("inf"), 1.5]


def test_edits_travel_with_tensor_fields():
    edit = AddVector(torch.ones(4, dtype=torch.bfloat16), 0.5, (0, 2))
    _, header = round_trip({"edit": edit, "scale": Scale(2.0)})
    assert isinstance(header["edit"], AddVector) and header["edit"].positions == (0, 2)
    assert torch.equal(header["edit"].vector, edit.vector) and header["scale"] == Scale(2.0)


def test_tampering_and_wrong_key_are_refused():
    frames = encode(MsgType.REQUEST, {"op": "status", "x": torch.ones(3)}, KEY)
    with pytest.raises(ProtocolError, match="wrong token"):
        decode(frames, b"other")
    bad = list(frames)
    bad[3] = bytes(bad[3])[:-1] + b"\x01"
    with pytest.raises(ProtocolError, match="bad signature"):
        decode(bad, KEY)
    with pytest.raises(ProtocolError, match="at least 3 frames"):
        decode(frames[:2], KEY)


def signed(kind: bytes, head: bytes, *buffers: bytes):
    from djinn_kernel.protocol import sign

    return [kind, head, b":" + sign(KEY, [b"", kind, head, *buffers]), *buffers]


@pytest.mark.parametrize(
    "frames, message",
    [
        (signed(b"\x09", b"{}"), "unknown message type"),
        (signed(b"\x01", b"not json"), "not JSON"),
        (signed(b"\x01", b"[1]"), "not a JSON object"),
        (signed(b"\x01", b'{"v": 99}'), "protocol version"),
        (signed(b"\x01", json.dumps({"v": 2, "t": {"__tensor__": 0, "dtype": "float32", "shape": [2]}}).encode(), b"abc"), "needs 8 bytes"),
        (signed(b"\x01", json.dumps({"v": 2, "t": {"__tensor__": 1, "dtype": "float32", "shape": [0]}}).encode()), "buffer 1"),
        (signed(b"\x01", json.dumps({"v": 2, "t": {"__tensor__": 0, "dtype": "object", "shape": [1]}}).encode(), b"a"), "dtype"),
        (signed(b"\x01", json.dumps({"v": 2, "t": {"__tensor__": 0, "dtype": "uint8", "shape": [-1]}}).encode(), b"a"), "shape"),
    ],
)
def test_malformed_messages(frames, message):
    with pytest.raises(ProtocolError, match=message):
        decode(frames, KEY)


def test_unsendable_values():
    with pytest.raises(InvalidArgumentError, match="cannot be sent"):
        encode(MsgType.REQUEST, {"x": object()}, KEY)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        encode(MsgType.REQUEST, {"x": torch.ones(2, dtype=torch.complex64)}, KEY)


def test_errors_map_by_class():
    with pytest.raises(SessionBusyError, match="busy"):
        raise_error(error_body(SessionBusyError("busy")))
    with pytest.raises(InvalidTensorError):
        raise_error(error_body(InvalidTensorError("x")))
    body = error_body(ZeroDivisionError("boom"))
    assert body == {"type": "DjinnError", "message": "internal error in the daemon: ZeroDivisionError: boom"}


def test_bind_args():
    assert bind_args("resume", (3,), {"mode": "step"}) == {"sid": 3, "mode": "step"}
    with pytest.raises(InvalidArgumentError, match="unknown operation"):
        bind_args("rm_rf", (), {})
    with pytest.raises(InvalidArgumentError, match="no argument"):
        bind_args("resume", (3,), {"force": True})
    with pytest.raises(InvalidArgumentError, match="twice"):
        bind_args("resume", (3,), {"sid": 4})
    with pytest.raises(InvalidArgumentError, match="at most"):
        bind_args("cancel", (1, 2), {})


def test_the_op_table_and_the_engine_agree_on_every_argument():
    """``OPS`` is the wire's and the client's table; the engine implements each op with exactly those arguments
    (the daemon adds ``owner`` itself), so an op changed in one place and not the other fails here."""
    import inspect

    from djinn_kernel.cluster.backend import ClusterBackend
    from djinn_kernel.engine import Engine
    from djinn_kernel.protocol import CLUSTER_OPS, OPS

    daemon_only = {"heartbeat", "goodbye", "hello"}
    assert set(CLUSTER_OPS) == {"migrate", "load_split"}  # the cluster backend's own ops (`djinn serve --ray`), listed here on purpose
    for op, names in OPS.items():
        if op in daemon_only:
            assert not hasattr(Engine, op)
            continue
        # Every op is the cluster backend's too (the daemon serves either); a cluster-only op is not the Engine's.
        implementers = (ClusterBackend,) if op in CLUSTER_OPS else (Engine, ClusterBackend)
        if op in CLUSTER_OPS:
            assert not hasattr(Engine, op), op
        for cls in implementers:
            params = [p for p in inspect.signature(getattr(cls, op)).parameters if p not in ("self", "owner")]
            assert tuple(params) == names, (cls.__name__, op)
