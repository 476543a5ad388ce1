"""Remote use and the daemon's edge: CURVE on tcp://, replays refused, per-user tokens, owner-only operations,
the maximum message size, and a table of malformed wire messages (each a clear ProtocolError, daemon up)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

import djinn_kernel as dj
from conftest import PROMPT
from daemon_util import WAIT_MS, DaemonProcess, RawPeer, forge, request, tensor
from djinn_kernel import cli
from djinn_kernel.auth import ReplayGuard, TokenStore, parse_token, server_keypair
from djinn_kernel.client import DaemonClient, connect
from djinn_kernel.daemon import Client, Daemon, Security
from djinn_kernel.errors import ERRORS_BY_NAME
from djinn_kernel.protocol import MsgType, decode, encode, sign

KEY = b"k" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENDPOINT = f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess("--listen", ENDPOINT, "--max-message-size", "1MiB")
    yield d
    d.stop()


@pytest.fixture
def in_daemon_folder(daemon, monkeypatch):
    """Run `djinn token ...` against the test daemon's runtime folder."""
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(daemon.folder))
    return daemon.folder


def add_token(name: str, capsys) -> str:
    assert cli.main(["token", "add", name]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture
def peer(daemon):
    p = RawPeer(daemon.info.ipc, daemon.info.key())
    yield p
    p.close()


# tokens and keys ---------------------------------------------------------------------------------------------


def test_parse_token():
    assert parse_token("abc123") == ("", b"abc123")
    assert parse_token("alice:ff00\n") == ("alice", b"ff00")
    for bad in ("al ice:ff", ":ff", "alice:"):
        with pytest.raises(dj.InvalidArgumentError, match="NAME:SECRET"):
            parse_token(bad)


def test_token_store_is_private_and_seen_by_a_running_daemon(tmp_path):
    writer, reader = TokenStore(tmp_path), TokenStore(tmp_path)  # the CLI and the daemon
    assert reader.key("alice") is None
    token = writer.add("alice")
    user, key = parse_token(token)
    assert user == "alice" and reader.key("alice") == key and len(key) == 64
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    with pytest.raises(dj.InvalidArgumentError, match="already"):
        writer.add("alice")
    with pytest.raises(dj.InvalidArgumentError, match="not a user name"):
        writer.add("../etc")
    writer.add("bob")
    assert writer.names() == ["alice", "bob"]
    writer.remove("alice")
    assert reader.key("alice") is None and reader.key("bob") is not None
    with pytest.raises(dj.InvalidArgumentError, match="no token named"):
        writer.remove("alice")


def test_server_keypair_is_kept_and_private(tmp_path):
    public, secret = server_keypair(tmp_path)
    assert server_keypair(tmp_path) == (public, secret) and len(public) == len(secret) == 40
    assert zmq.curve_public(secret) == public
    assert stat.S_IMODE(os.stat(tmp_path / "curve.json").st_mode) == 0o600


def test_token_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    token = add_token("carol", capsys)
    assert token.startswith("carol:") and len(token) == len("carol:") + 64
    assert cli.main(["token", "list"]) == 0 and capsys.readouterr().out == "carol\n"
    assert cli.main(["token", "add", "carol"]) == 2 and "already" in capsys.readouterr().err
    assert cli.main(["token", "remove", "carol"]) == 0
    assert cli.main(["token", "remove", "carol"]) == 2 and "no token named" in capsys.readouterr().err
    assert cli.main(["token", "list"]) == 0 and capsys.readouterr().out == ""


# replay ------------------------------------------------------------------------------------------------------


def test_replay_guard_bookkeeping():
    guard = ReplayGuard("d1", max_clients=2, window=8)
    for seq in (1, 5, 3):  # two sockets of one client: numbers may arrive out of order, each once
        guard.check("", request("d1", seq))
    for seq in (5, 3, 1):
        with pytest.raises(dj.ProtocolError, match=f"replayed request refused: sequence number {seq} was used"):
            guard.check("", request("d1", seq))
    guard.check("", request("d1", 10**18))  # a jump far ahead keeps nothing but the newest
    with pytest.raises(dj.ProtocolError, match="too old"):
        guard.check("", request("d1", 10**18 - 8))
    guard.check("", request("d1", 10**18 - 7))
    guard.check("alice", request("d1", 1))  # another user's client of the same id counts on its own
    with pytest.raises(dj.ProtocolError, match="another daemon"):
        guard.check("", request("d0", 9))
    with pytest.raises(dj.ProtocolError, match="sequence number"):
        guard.check("", {**request("d1", 1), "seq": True})
    with pytest.raises(dj.ProtocolError, match="client id"):
        guard.check("", {**request("d1", 9), "client": None})
    guard.check("", {**request("", 1, client="h" * 32), "op": "hello"})  # before the daemon's id is known
    guard.check("", request("d1", 1))  # a third client pushed out the least recent one, ("", "c" * 32)


def test_a_captured_message_replayed_is_refused(daemon, peer):
    instance = daemon.client().daemon["instance"]
    first = encode(MsgType.REQUEST, request(instance, 1), peer.key)
    assert peer.ask(first)[0] is MsgType.REPLY
    kind, reply = peer.ask(first)
    assert kind is MsgType.ERROR and reply["id"] == 1
    assert reply["error"]["type"] == "ProtocolError" and "replayed" in reply["error"]["message"]
    assert peer.ask(encode(MsgType.REQUEST, request(instance, 3), peer.key))[0] is MsgType.REPLY
    assert peer.ask(encode(MsgType.REQUEST, request(instance, 2), peer.key))[0] is MsgType.REPLY, "out of order"
    kind, reply = peer.ask(encode(MsgType.REQUEST, request(instance, 2), peer.key))
    assert kind is MsgType.ERROR and "sequence number 2 was used" in reply["error"]["message"]
    assert peer.ask(encode(MsgType.REQUEST, request(instance, 4, op="goodbye"), peer.key))[0] is MsgType.REPLY
    kind, reply = peer.ask(first)
    assert kind is MsgType.ERROR and "replayed" in reply["error"]["message"], "a client that left stays refused"
    kind, reply = peer.ask(encode(MsgType.REQUEST, request("0" * 16, 9), peer.key))
    assert kind is MsgType.ERROR and "another daemon" in reply["error"]["message"]
    assert daemon.client().status()["daemon"]["pid"] == daemon.info.pid


# encryption --------------------------------------------------------------------------------------------------


class Relay:
    """A TCP relay between a client and the daemon that keeps every byte the client sent and received."""

    def __init__(self, target: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        inside, _ = self.listener.accept()
        outside = socket.create_connection(("127.0.0.1", self.target))
        self.sockets += [inside, outside]
        threading.Thread(target=self._pump, args=(outside, inside, self.received), daemon=True).start()
        self._pump(inside, outside, self.sent)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: list[bytes]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                record.append(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_tcp_traffic_is_encrypted_and_cannot_be_replayed(daemon):
    relay = Relay(int(ENDPOINT.rsplit(":", 1)[1]))
    token = daemon.info.key().decode()
    client = connect(f"tcp://127.0.0.1:{relay.port}", token=token, server_key=daemon.info.server_key, name="XYZZY-name")
    with pytest.raises(dj.ModelNotFoundError, match="XYZZY-model"):
        client.load_model("XYZZY-model")
    client.close()
    relay.close()
    sent, received = b"".join(relay.sent), b"".join(relay.received)
    assert len(sent) > 200 and len(received) > 200
    for secret in (b"XYZZY", b"load_model", token.encode()):
        assert secret not in sent and secret not in received
    with socket.create_connection(("127.0.0.1", relay.target), timeout=30) as replay:
        replay.sendall(sent)
        while replay.recv(65536):
            pass  # until the daemon closes the connection: the recorded handshake is not valid twice


def test_plain_text_peer_is_refused_on_tcp(daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket()
    sock.connect(ENDPOINT)
    sock.send(b"hello in clear")
    events = []
    while not events or events[-1] not in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_SUCCEEDED):
        assert monitor.poll(WAIT_MS)
        events.append(recv_monitor_message(monitor)["event"])
    assert events[-1] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)


def test_wrong_server_key_fails_fast(daemon):
    start = time.monotonic()
    with pytest.raises(dj.DaemonConnectionError, match="wrong server key"):
        DaemonClient(ENDPOINT, daemon.info.key(), server_key=zmq.curve_keypair()[0])
    assert time.monotonic() - start < 10
    with pytest.raises(dj.DaemonConnectionError, match="40 characters"):
        DaemonClient(ENDPOINT, daemon.info.key(), server_key="short")


def test_a_local_tcp_client_finds_the_published_server_key(daemon, in_daemon_folder):
    client = connect(ENDPOINT, token=daemon.info.key().decode())
    assert client.daemon["user"] == "" and client.status()["daemon"]["pid"] == daemon.info.pid
    client.close()


def test_tcp_is_refused_where_curve_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(zmq, "has", lambda feature: feature != "curve")
    with pytest.raises(dj.EncryptionUnavailableError, match="without CURVE"):
        connect("tcp://127.0.0.1:9", token="t", server_key="k" * 40)
    with pytest.raises(dj.EncryptionUnavailableError):
        Daemon(None, Security(KEY), ["tcp://127.0.0.1:9"])
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    assert cli.main(["serve", "--listen", "tcp://127.0.0.1:9"]) == 2
    assert "tcp:// is refused" in capsys.readouterr().err


# users -------------------------------------------------------------------------------------------------------


def test_named_users_own_their_sessions_and_cannot_stop_the_daemon(daemon, in_daemon_folder, capsys):
    alice = connect(ENDPOINT, token=add_token("alice", capsys), name="alice's notebook")
    bob = connect(ENDPOINT, token=add_token("bob", capsys))
    owner = daemon.client()
    assert alice.daemon["user"] == "alice"
    session = dj.load("tiny-gpt2", backend=alice).session()
    listed = [s for s in owner.status()["sessions"] if s["id"] == session.id]
    assert [(s["owner"], s["mine"]) for s in listed] == [("alice", False)]
    assert [s["id"] for s in alice.sessions()] == [session.id] and bob.sessions() == []
    with pytest.raises(dj.SessionClosedError):
        bob.describe_session(session.id)
    with pytest.raises(dj.PermissionDeniedError, match="only the daemon's owner"):
        alice.shutdown()
    assert session.generate(PROMPT, 2).state == "finished", "alice's session still works"
    assert cli.main(["token", "remove", "alice"]) == 0
    with pytest.raises(dj.ProtocolError, match="wrong token"):
        alice.status()
    assert bob.status()["daemon"]["pid"] == owner.status()["daemon"]["pid"] == daemon.info.pid
    alice.close()
    bob.close()
    assert cli.main(["token", "remove", "bob"]) == 0


def test_a_session_opened_as_its_client_expires_is_reclaimed():
    class Engine:
        closed: list[int] = []

        def close_session(self, sid: int) -> None:
            self.closed.append(sid)

    daemon = Daemon(Engine(), Security(KEY), [])
    try:
        client = Client("client-1")
        assert daemon._adopt(client, 1) == 1 and client.sessions == {1}
        client.expired = True
        with pytest.raises(dj.SessionClosedError, match="lease ran out"):
            daemon._adopt(client, 2)
        assert Engine.closed == [2] and client.sessions == {1}
    finally:
        daemon._pool.shutdown()
        daemon._ctx.term()


# message size ------------------------------------------------------------------------------------------------


def peak_rss_since_reset(pid: int) -> Callable[[], int]:
    """Reset the process's peak RSS (Linux ``clear_refs``) and return a reader of its growth since, in bytes."""
    status = f"/proc/{pid}/status"

    def field(name: str) -> int:
        line = next(line for line in open(status) if line.startswith(name))
        return int(line.split()[1]) * 1024

    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    base = field("VmRSS:")
    return lambda: field("VmHWM:") - base


def test_an_oversized_frame_is_dropped_before_it_is_buffered(daemon):
    client = daemon.client()
    growth = peak_rss_since_reset(daemon.info.pid)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(daemon.info.ipc)
    sock.send(bytes(128 << 20))  # unsigned, 128 MiB; the daemon's limit is 1 MiB
    assert monitor.poll(WAIT_MS), "the daemon drops the connection"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)
    assert growth() < 32 << 20, f"the daemon's peak memory grew by {growth() >> 20} MiB"
    assert client.status()["daemon"]["max_message"] == 1 << 20
    with pytest.raises(dj.MessageTooLargeError, match="max-message-size"):
        client.call("token_strings", 1, torch.zeros(1 << 19))
    assert client.status()["daemon"]["pid"] == daemon.info.pid, "the client and the daemon go on"


# the malformed-message table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    name: str
    build: Callable[[bytes, dict], list[bytes]]  # (key, a valid request header) -> frames
    match: str
    daemon_only: bool = False  # refused by the daemon's checks after decoding, not by the decoder


def carrying(values: dict, *buffers: bytes) -> Callable[[bytes, dict], list[bytes]]:
    """A well-signed request with ``values`` added to its header and ``buffers`` as its raw frames."""
    return lambda k, h: forge(k, {**h, **values}, *buffers)


def raw_header(head: bytes) -> Callable[[bytes, dict], list[bytes]]:
    return lambda k, h: forge(k, head)


DEEP = b'{"v": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

BAD = [
    Bad("two frames", lambda k, h: forge(k, h)[:2], "at least 3 frames"),
    Bad("tampered buffer", lambda k, h: [*forge(k, {**h, "t": tensor()}, bytes(8))[:3], b"\x01" * 8], "bad signature"),
    Bad("wrong key", lambda k, h: forge(b"x" * 64, h), "bad signature"),
    Bad("unknown user", lambda k, h: forge(k, h, user=b"mallory"), "no such token", daemon_only=True),
    Bad("non-ASCII key name", lambda k, h: forge(k, h, user="é".encode()), "not ASCII", daemon_only=True),
    Bad("protocol version 1", lambda k, h: forge(k, json.dumps({**h, "v": 1}).encode()), "protocol version 1"),
    Bad("no protocol version", lambda k, h: forge(k, json.dumps(h).encode()), "protocol version None"),
    Bad("unknown message type", lambda k, h: forge(k, h, kind=b"\x09"), "unknown message type"),
    Bad("two-byte type", lambda k, h: forge(k, h, kind=b"\x01\x01"), "unknown message type"),
    Bad("a reply sent to the daemon", lambda k, h: forge(k, h, kind=b"\x02"), "accepts requests", daemon_only=True),
    Bad("header not JSON", raw_header(b"{not json"), "not JSON"),
    Bad("header not UTF-8", raw_header(b'{"v": 2, "x": "\xff"}'), "not JSON"),
    Bad("header a list", raw_header(b"[2]"), "not a JSON object"),
    Bad("header nested too deeply", raw_header(DEEP), "nested too deeply"),
    Bad("a 10^12-byte tensor", carrying({"t": tensor(shape=(250_000_000_000,))}, bytes(8)),
        "needs 1000000000000 bytes, buffer has 8"),
    Bad("truncated tensor bytes", carrying({"t": tensor()}, bytes(5)), "needs 8 bytes, buffer has 5"),
    Bad("dimension beyond int64", carrying({"t": tensor(shape=(0, 2**63))}, b""), "bad tensor shape"),
    Bad("negative dimension", carrying({"t": tensor(shape=(-1,))}, b""), "bad tensor shape"),
    Bad("65 dimensions", carrying({"t": tensor(shape=(1,) * 65)}, bytes(4)), "bad tensor shape"),
    Bad("boolean dimension", carrying({"t": tensor(shape=(True,))}, bytes(4)), "bad tensor shape"),
    Bad("shape not a list", carrying({"t": {**tensor(), "shape": "2"}}, bytes(8)), "bad tensor shape"),
    Bad("dtype float128", carrying({"t": tensor(dtype="float128")}, bytes(8)), "unsupported tensor dtype"),
    Bad("dtype object", carrying({"t": tensor(dtype="object")}, bytes(8)), "unsupported tensor dtype"),
    Bad("dtype not a string", carrying({"t": tensor(dtype=["float32"])}, bytes(8)), "unsupported tensor dtype"),
    Bad("buffer index past the frames", carrying({"t": tensor(index=1)}, bytes(8)), "refers to buffer 1"),
    Bad("buffer index a string", carrying({"t": tensor(index="0")}, bytes(8)), "refers to buffer"),
    Bad("one buffer, two tensors", carrying({"a": tensor(), "b": tensor()}, bytes(8)), "claimed by two tensors"),
    Bad("a buffer no tensor claims", carrying({"t": tensor()}, bytes(8), bytes(8)), "2 buffers, but its header uses 1"),
    Bad("buffers and no tensor", carrying({}, bytes(8)), "1 buffers, but its header uses 0"),
    Bad("bad non-finite float", carrying({"x": {"__float__": "1e999"}}), "non-finite float"),
    Bad("edit without fields", carrying({"e": {"__edit__": "scale"}}), "edit without fields"),
    Bad("no sequence number", carrying({"seq": None}), "sequence number", daemon_only=True),
    Bad("no client id", carrying({"client": 7}), "client id", daemon_only=True),
    Bad("another daemon's id", carrying({"daemon": "0" * 16}), "another daemon", daemon_only=True),
]


@pytest.mark.parametrize("bad", [b for b in BAD if not b.daemon_only], ids=lambda b: b.name)
def test_the_decoder_refuses(bad):
    with pytest.raises(dj.ProtocolError, match=bad.match):
        decode(bad.build(KEY, request("d", 1)), KEY)


def test_a_protocol_1_client_is_told_to_upgrade(daemon, peer):
    """A client of the previous version verifies the answer with its own framing and reads the version in it."""
    kind = bytes([MsgType.REQUEST])
    head = json.dumps({"v": 1, "op": "status", "args": {}, "id": 1, "client": "old"}).encode()
    peer.sock.send_multipart([kind, head, sign(peer.key, [kind, head])])
    assert peer.sock.poll(WAIT_MS)
    reply_kind, reply_head, signature = peer.sock.recv_multipart()
    assert signature == sign(peer.key, [reply_kind, reply_head]), "signed as protocol 1 signs"
    header = json.loads(reply_head)
    assert header["v"] == 2 and header["error"]["type"] == "ProtocolError"
    with pytest.raises(dj.ProtocolError, match="does not name its key: the other side runs an older djinn-kernel"):
        decode([reply_kind, reply_head, signature], peer.key)  # and this side, reading protocol 1, says so too


@pytest.fixture(scope="module")
def paused(daemon):
    """A session paused mid-run while the bad messages arrive; its tokens must come out unchanged."""
    client = daemon.client()
    model = dj.load("tiny-llama", backend=client)
    with model.session() as s:
        reference = s.generate(PROMPT, 6).tokens
        s.break_at(1, tokens=3)
        run = s.generate(PROMPT, 6)
        assert run.paused
        yield client
        assert run.finish().tokens == reference


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
def test_the_daemon_refuses_and_goes_on(bad, daemon, peer, paused):
    header = request(paused.daemon["instance"], 1, client=uuid.uuid4().hex)
    kind, reply = peer.ask(bad.build(peer.key, header))
    assert kind is MsgType.ERROR and reply["error"]["type"] in ERRORS_BY_NAME
    assert issubclass(ERRORS_BY_NAME[reply["error"]["type"]], dj.ProtocolError)
    assert bad.match in reply["error"]["message"]
    assert paused.status()["daemon"]["pid"] == daemon.info.pid
