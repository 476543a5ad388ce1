"""The GPU-owning daemon: one engine, many clients over ZeroMQ.

Threads:
- The IO thread owns both sockets. It verifies and decodes requests, answers heartbeats, expires clients
  whose lease ran out, and forwards replies; it never waits on a forward.
- Worker threads run engine calls (a ``generate`` blocks its worker until the run pauses or ends) and send
  their reply through a per-thread PUSH socket to the IO thread, since ZeroMQ sockets are single-threaded.

Edge rules: a request must be signed with the daemon's key, name a known op with known arguments, and may
touch only sessions its client opened; a session of another client is reported exactly like a missing one.
A client is known by the id in every request header and kept alive by heartbeats from its own thread; when
none arrives for ``lease`` seconds (kernel restart, crash, lost network), every session it owned is closed and
its memory reclaimed. A failing request produces an error reply to that request only.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import __version__
from .engine import Engine
from .errors import DjinnError, InvalidArgumentError, ProtocolError, SessionClosedError
from .protocol import OPS, PROTOCOL_VERSION, MsgType, decode, encode, error_body

REPLIES = "inproc://djinn-replies"


@dataclass
class Client:
    label: str
    name: str = "?"
    pid: int | None = None
    sessions: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)


class Daemon:
    def __init__(
        self, engine: Engine, key: bytes, endpoints: list[str], workers: int = 64, lease: float = 5.0
    ) -> None:
        self.engine = engine
        self.key = key
        self.endpoints = endpoints
        self.lease = lease
        self._ctx = zmq.Context()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="djinn-request")
        self._clients: dict[str, Client] = {}
        self._clients_lock = threading.Lock()
        self._labels = itertools.count(1)
        self._local = threading.local()
        self._stop = threading.Event()

    # IO thread ------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        for endpoint in self.endpoints:
            if endpoint.startswith("tcp://"):
                router.setsockopt(zmq.TCP_KEEPALIVE, 1)
                router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
            router.bind(endpoint)
        replies = self._ctx.socket(zmq.PULL)
        replies.bind(REPLIES)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(200))
                while router in ready and router.poll(0):
                    identity, *frames = router.recv_multipart()
                    self._on_request(router, identity, frames)
                while replies in ready and replies.poll(0):
                    router.send_multipart(replies.recv_multipart(), copy=False)
                self._expire()
            while replies.poll(100):  # the last replies, the answer to `shutdown` among them
                router.send_multipart(replies.recv_multipart(), copy=False)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.engine.shutdown()
            router.close(0)
            replies.close(0)

    def stop(self) -> None:
        self._stop.set()

    def _expire(self) -> None:
        """Reclaim the sessions of clients whose heartbeats stopped (their process or network went away)."""
        now = time.monotonic()
        with self._clients_lock:
            dead = [cid for cid, c in self._clients.items() if now - c.last_seen > self.lease]
            gone = [self._clients.pop(cid) for cid in dead]
        for client in gone:
            for sid in sorted(client.sessions):
                self._pool.submit(self._reclaim, sid)

    def _reclaim(self, sid: int) -> None:
        try:
            self.engine.close_session(sid)
        except SessionClosedError:
            pass

    def _on_request(self, router: zmq.Socket, identity: bytes, frames: list[bytes]) -> None:
        try:
            kind, header = decode(frames, self.key)
            if kind is not MsgType.REQUEST:
                raise ProtocolError(f"the daemon accepts requests, not {kind.name}")
            client_id = header.get("client")
            if not isinstance(client_id, str) or not 0 < len(client_id) <= 64:
                raise ProtocolError("a request must carry its client id")
        except DjinnError as exc:
            router.send_multipart([identity, *encode(MsgType.ERROR, {"id": 0, "error": error_body(exc)}, self.key)])
            return
        with self._clients_lock:
            client = self._clients.get(client_id)
            if client is None:
                client = self._clients[client_id] = Client(f"client-{next(self._labels)}")
            client.last_seen = time.monotonic()
        if header.get("op") in ("heartbeat", "goodbye"):
            if header["op"] == "goodbye":
                client.last_seen = float("-inf")  # expired on this very loop iteration
            router.send_multipart([identity, *encode(MsgType.REPLY, {"id": header.get("id"), "result": None}, self.key)])
            return
        self._pool.submit(self._execute, identity, client, header)

    # worker threads -------------------------------------------------------------------------------------
    def _push(self) -> zmq.Socket:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(REPLIES)
            self._local.push = sock
        return sock

    def _execute(self, identity: bytes, client: Client, header: dict[str, Any]) -> None:
        request_id = header.get("id") if isinstance(header.get("id"), int) else 0
        try:
            result = self._dispatch(client, header.get("op"), header.get("args", {}))
            frames = encode(MsgType.REPLY, {"id": request_id, "result": result}, self.key)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes this request's error reply
            frames = encode(MsgType.ERROR, {"id": request_id, "error": error_body(exc)}, self.key)
        self._push().send_multipart([identity, *frames], copy=False)
        if header.get("op") == "shutdown":
            self.stop()  # after the reply is queued, so the caller learns that the daemon is going

    def _dispatch(self, client: Client, op: object, args: object) -> Any:
        if not isinstance(op, str) or op not in OPS:
            raise InvalidArgumentError(f"unknown operation {op!r}")
        if not isinstance(args, dict) or set(args) - set(OPS[op]):
            raise InvalidArgumentError(f"{op} takes arguments {', '.join(OPS[op]) or 'none'}, got {args!r}")
        if "sid" in args:
            self._check_owner(client, args["sid"])
        if op == "hello":
            client.name, client.pid = str(args.get("name", "?")), args.get("pid")
            return {**self.describe(), "lease": self.lease}
        if op == "shutdown":
            return {"stopping": True}
        if op == "open_session":
            sid = self.engine.open_session(args.get("model_id"), owner=client.label)
            client.sessions.add(sid)
            return sid
        if op == "fork":
            sid = self.engine.fork(args["sid"])
            client.sessions.add(sid)
            return sid
        if op == "close_session":
            client.sessions.discard(args["sid"])
            return self.engine.close_session(args["sid"])
        if op == "sessions":
            return self.engine.sessions(owner=client.label)
        if op == "status":
            return self._status(client)
        method = getattr(self.engine, op)
        try:
            inspect.signature(method).bind(**args)
        except TypeError as exc:
            raise InvalidArgumentError(f"{op}: {exc}") from None
        return method(**args)

    @staticmethod
    def _check_owner(client: Client, sid: object) -> None:
        if isinstance(sid, bool) or not isinstance(sid, int) or sid not in client.sessions:
            raise SessionClosedError(f"session {sid!r} does not exist or was closed; open a new one with model.session()")

    def _status(self, client: Client) -> dict[str, Any]:
        """The engine's status with other clients' sessions reduced to state and memory (no content)."""
        status = self.engine.status()
        sessions = []
        for s in status["sessions"]:
            mine = s["id"] in client.sessions
            sessions.append(s if mine else {k: s[k] for k in ("id", "owner", "model", "state", "memory")})
            sessions[-1]["mine"] = mine
        with self._clients_lock:
            clients = [{"label": c.label, "name": c.name, "sessions": len(c.sessions)} for c in self._clients.values()]
        return {**status, "sessions": sessions, "clients": clients, "daemon": self.describe()}

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "endpoints": self.endpoints,
            "device": str(self.engine.device),
        }


def install_signal_handlers(daemon: Daemon) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
