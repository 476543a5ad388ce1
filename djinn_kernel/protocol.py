"""The wire format between clients (kernels) and the daemon. Nothing on the wire is ever unpickled.

A message is a list of ZeroMQ frames:

    [type: 1 byte] [header: UTF-8 JSON] [signature: KEY-ID ":" hex HMAC-SHA256] [buffer 0] [buffer 1] ...

- ``type`` is a ``MsgType`` (request, reply, error).
- ``header`` is a JSON object with ``"v"`` (``PROTOCOL_VERSION``), ``"id"`` (the request id a reply answers),
  and for a request ``"op"`` plus ``"args"``; for a reply ``"result"``; for an error ``"error": {"type",
  "message"}``. Values that JSON cannot hold are encoded as tagged objects: a tensor is
  ``{"__tensor__": i, "dtype": "bfloat16", "shape": [..]}`` whose bytes are raw buffer ``i``; an activation
  edit is ``{"__edit__": kind, "fields": {..}}``; a NaN or infinite float is ``{"__float__": "nan"}``; a range is
  ``{"__range__": [start, stop, step]}``.
- A request's header also carries what makes it unrepeatable: ``"client"`` (a random id per client),
  ``"seq"`` (1, 2, 3, ... across the client's sockets) and, after ``hello``, ``"daemon"`` (the id the daemon
  gave itself at start). The daemon refuses a number it has seen from that client, one far older than its
  newest, and another daemon's id, so a captured message cannot be replayed (see ``auth.ReplayGuard``).
- ``signature`` names the key (empty for the daemon's own key, else the user of a ``djinn token add`` token)
  and is HMAC-SHA256 over that name, the type, the header and every buffer. It is checked with
  ``hmac.compare_digest`` before anything is decoded, so an unauthenticated peer cannot make the daemon parse
  a single byte of JSON.
- Tensors travel as their raw bytes (C-contiguous, little-endian as in memory), so every dtype, bf16
  included, round-trips bit for bit. Every buffer belongs to exactly one tensor.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
from typing import Any

import torch

from .edits import Edit, edit_from_parts
from .errors import ERRORS_BY_NAME, DjinnError, InvalidArgumentError, InvalidTensorError, ProtocolError

PROTOCOL_VERSION = 2
MAX_DIMS = 64  # more dimensions than torch handles are refused before any allocation

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
        "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}


class MsgType(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in a fresh buffer. Always a copy: a NumPy view pins its storage (it can no longer be
    resized), and the buffer lives on in ZeroMQ after this call, so it must never alias memory Djinn may page."""
    t = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _encode_value(value: Any, buffers: list[memoryview]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise InvalidTensorError("a tensor on device meta holds no data and cannot be sent; pass a CPU tensor")
        name = str(value.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise InvalidArgumentError(f"tensors of dtype {value.dtype} cannot be sent; supported: {', '.join(DTYPES)}")
        buffers.append(_tensor_bytes(value))
        return {"__tensor__": len(buffers) - 1, "dtype": name, "shape": list(value.shape)}
    if isinstance(value, Edit):
        fields = {k: _encode_value(v, buffers) for k, v in {**value.scalars(), **value.tensors()}.items()}
        return {"__edit__": value.kind, "fields": fields}
    if isinstance(value, dict):
        return {str(k): _encode_value(v, buffers) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_value(v, buffers) for v in value]
    if isinstance(value, range):
        return {"__range__": [value.start, value.stop, value.step]}  # decoded to the same range: same rules both ways
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}  # strict JSON has no NaN/Inf; the daemon still sees (and refuses) them
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidArgumentError(f"a {type(value).__name__} cannot be sent to the daemon")


class _Buffers:
    """A message's raw buffers, each claimed by exactly one tensor: a buffer no tensor names, or one named twice,
    means the header and the frames disagree (a truncated or spliced message)."""

    def __init__(self, frames: list[bytes | memoryview]) -> None:
        self.frames = frames
        self.claimed: set[int] = set()

    def claim(self, index: object) -> bytes | memoryview:
        if type(index) is not int or not 0 <= index < len(self.frames):
            raise ProtocolError(f"tensor refers to buffer {index!r:.40}, but the message has {len(self.frames)}")
        if index in self.claimed:
            raise ProtocolError(f"buffer {index} is claimed by two tensors")
        self.claimed.add(index)
        return self.frames[index]

    def check_all_claimed(self) -> None:
        if len(self.claimed) != len(self.frames):
            raise ProtocolError(f"the message has {len(self.frames)} buffers, but its header uses {len(self.claimed)}")


def _decode_value(value: Any, buffers: _Buffers) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return _decode_tensor(value, buffers)
        if "__float__" in value:
            if value["__float__"] not in ("nan", "inf", "-inf"):
                raise ProtocolError(f"bad non-finite float {value['__float__']!r:.40}")
            return float(value["__float__"])
        if "__range__" in value:
            bounds = value["__range__"]
            if not (isinstance(bounds, list) and len(bounds) == 3 and all(type(b) is int for b in bounds) and bounds[2]):
                raise ProtocolError(f"bad range {bounds!r:.60}")
            return range(*bounds)
        if "__edit__" in value:
            fields = value.get("fields")
            if not isinstance(fields, dict):
                raise ProtocolError("an edit without fields")
            decoded = {k: _decode_value(v, buffers) for k, v in fields.items()}
            tensors = {k: v for k, v in decoded.items() if isinstance(v, torch.Tensor)}
            scalars = {k: v for k, v in decoded.items() if k not in tensors}
            return edit_from_parts(str(value["__edit__"]), scalars, tensors)
        return {k: _decode_value(v, buffers) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_value(v, buffers) for v in value]
    return value


def _valid_shape(shape: object) -> bool:
    """Dimensions torch can hold (ints, not bools, within int64), checked before anything is allocated."""
    return (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(d) is int and 0 <= d < 2**63 for d in shape)
    )


def _decode_tensor(spec: dict[str, Any], buffers: _Buffers) -> torch.Tensor:
    dtype_name, shape = spec.get("dtype"), spec.get("shape")
    raw = buffers.claim(spec.get("__tensor__"))
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {dtype_name!r:.40}; supported: {', '.join(DTYPES)}")
    if not _valid_shape(shape):
        raise ProtocolError(f"bad tensor shape {shape!r:.80}")
    dtype = DTYPES[dtype_name]
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise ProtocolError(f"tensor {dtype_name}{shape} needs {numel * itemsize} bytes, buffer has {len(raw)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def sign(key: bytes, frames: list[bytes | memoryview]) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        mac.update(frame)
    return mac.hexdigest().encode()


def encode(msg_type: MsgType, header: dict[str, Any], key: bytes, user: str = "") -> list[bytes | memoryview]:
    """Frames for one message signed with ``user``'s key ("" is the daemon's own); tensors and edits anywhere in
    ``header`` become raw buffers."""
    buffers: list[memoryview] = []
    body = _encode_value({**header, "v": PROTOCOL_VERSION}, buffers)
    head = [bytes([msg_type]), json.dumps(body, separators=(",", ":"), allow_nan=False).encode()]
    name = user.encode()
    return [*head, name + b":" + sign(key, [name, *head, *buffers]), *buffers]


def _split(frames: list[bytes | memoryview]) -> tuple[bytes, bytes, bytes, bytes, list[bytes | memoryview]]:
    if len(frames) < 3:
        raise ProtocolError(f"a message has at least 3 frames, got {len(frames)}")
    kind, head, signature, *buffers = frames
    user, sep, mac = bytes(signature).partition(b":")
    if not sep:
        raise ProtocolError(
            "the signature frame does not name its key: the other side runs an older djinn-kernel (protocol 1); "
            "upgrade it, or stop the old daemon with `djinn stop`"
        )
    return bytes(kind), bytes(head), user, mac, buffers


def signer(frames: list[bytes | memoryview]) -> str:
    """The user a message claims to be signed by ("" for the daemon's own key). Read before the signature is
    checked, only to choose the key to check it with; a false claim fails that check."""
    user = _split(frames)[2]
    try:
        return user.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("the signature names a key that is not ASCII") from None


def decode(frames: list[bytes | memoryview], key: bytes) -> tuple[MsgType, dict[str, Any]]:
    """Verify the signature with ``key``, then parse; raises ``ProtocolError`` for anything not exactly right."""
    kind, head, user, mac, buffers = _split(frames)
    if not hmac.compare_digest(mac, sign(key, [user, kind, head, *buffers])):
        raise ProtocolError("bad signature: the client and daemon keys differ (wrong token?)")
    if len(kind) != 1 or kind[0] not in MsgType._value2member_map_:
        raise ProtocolError(f"unknown message type {kind!r:.20}")
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header.get('v')!r:.20}, this side speaks {PROTOCOL_VERSION}: upgrade djinn-kernel on "
            f"both sides (or stop the old daemon with `djinn stop`)"
        )
    claimed = _Buffers(buffers)
    try:
        decoded = _decode_value(header, claimed)
    except RecursionError:
        raise ProtocolError("header is nested too deeply") from None
    claimed.check_all_claimed()
    return MsgType(kind[0]), decoded


def protocol_1_refusal(frames: list[bytes | memoryview], key: bytes) -> list[bytes] | None:
    """The answer to a protocol-1 peer (its signature frame names no key), framed and signed as protocol 1 did, so
    that peer reads "protocol version 2, this side speaks 1: upgrade" rather than "wrong token"; None otherwise."""
    if len(frames) < 3 or b":" in bytes(frames[2]):
        return None
    error = {"type": "ProtocolError", "message": f"this daemon speaks protocol {PROTOCOL_VERSION}; upgrade djinn"}
    kind = bytes([MsgType.ERROR])
    head = json.dumps({"v": PROTOCOL_VERSION, "id": 0, "error": error}).encode()
    return [kind, head, sign(key, [kind, head])]


def error_body(exc: BaseException) -> dict[str, str]:
    """How an exception travels: Djinn errors by class name, anything else as a generic DjinnError."""
    name = type(exc).__name__ if isinstance(exc, DjinnError) and type(exc).__name__ in ERRORS_BY_NAME else "DjinnError"
    message = str(exc) if isinstance(exc, DjinnError) else f"internal error in the daemon: {type(exc).__name__}: {exc}"
    return {"type": name, "message": message}


def raise_error(body: dict[str, Any]) -> None:
    cls = ERRORS_BY_NAME.get(str(body.get("type")), DjinnError)
    raise cls(str(body.get("message", "")))


# The operations a client may request, with their argument names in call order. The daemon refuses any other
# op or argument before touching the engine; the client maps positional calls onto these names. ``sid`` always
# names a session, which the daemon checks belongs to the calling client.
OPS: dict[str, tuple[str, ...]] = {
    "heartbeat": (),
    "goodbye": (),
    "hello": ("name", "pid"),
    "load_model": ("name", "dtype"),
    "load_split": ("name", "split_at", "dtype"),
    "models": (),
    "module_paths": ("model_id",),
    "token_strings": ("model_id", "token_ids"),
    "tokenize": ("model_id", "text"),
    "open_session": ("model_id",),
    "close_session": ("sid",),
    "sessions": (),
    "describe_session": ("sid",),
    "add_breakpoint": ("sid", "target", "side", "tokens", "max_hits", "when"),
    "remove_breakpoint": ("sid", "bp_id"),
    "add_steering": ("sid", "target", "edit", "side"),
    "remove_steering": ("sid", "steer_id"),
    "add_recording": ("sid", "target", "positions"),
    "remove_recording": ("sid", "recording_id"),
    "recorded": ("sid",),
    "attach_sae": ("sid", "target", "weights", "apply_b_dec_to_input"),
    "detach_sae": ("sid", "target"),
    "generate": ("sid", "prompt", "max_new_tokens", "chat", "temperature", "top_k", "seed", "keep_logits", "fresh"),
    "fork": ("sid",),
    "rewind": ("sid", "tokens"),
    "resume": ("sid", "mode"),
    "cancel": ("sid",),
    "wait": ("sid", "timeout"),
    "run_snapshot": ("sid",),
    "run_logits": ("sid",),
    "activation": ("sid", "original"),
    "edit": ("sid", "edit"),
    "reset_edits": ("sid",),
    "kv": ("sid", "layer"),
    "attention": ("sid",),
    "features": ("sid", "k"),
    "edit_kv": ("sid", "layer", "positions", "keys", "values"),
    "logit_lens": ("sid", "k", "position", "edit"),
    "page_out": ("sid",),
    "page_in": ("sid",),
    "io_wait": ("sid", "expected_s"),
    "compute": ("sid",),
    "migrate": ("sid", "engine"),
    "status": (),
    "shutdown": (),
}

# Operations only the daemon's owner may ask for (its local key, or the token `djinn serve` prints): they stop
# or reconfigure the daemon for every user. A `djinn token add` user gets ``PermissionDeniedError``.
OWNER_OPS = frozenset({"shutdown"})

# Operations only a cluster backend has (`djinn serve --ray`, djinn_kernel/cluster), with what they do: a daemon
# serving one ``Engine`` refuses them with ``InvalidArgumentError`` saying so.
CLUSTER_OPS = {"migrate": "migration", "load_split": "splitting a model by layer"}


def bind_args(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name a call's positional arguments after ``OPS[op]``; refuse unknown ops and arguments."""
    names = OPS.get(op)
    if names is None:
        raise InvalidArgumentError(f"unknown operation {op!r}")
    if len(args) > len(names):
        raise InvalidArgumentError(f"{op} takes at most {len(names)} arguments ({', '.join(names)})")
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise InvalidArgumentError(f"{op} has no argument {name!r}; it takes {', '.join(names) or 'none'}")
        if name in bound:
            raise InvalidArgumentError(f"{op} got {name!r} twice")
        bound[name] = value
    return bound
