"""The GPU-owning daemon: one engine, many clients over ZeroMQ. The engine is an ``Engine``, or with `djinn serve
--ray` a cluster backend (djinn_kernel/cluster) with the same methods, one engine per GPU behind it; the ops only
a cluster has (``CLUSTER_OPS``: ``migrate``, ``load_split``) are refused by name when the engine lacks them.

Threads:
- The IO thread owns the sockets: one ROUTER for the local ``ipc://`` endpoint and one, CURVE-encrypted, for
  the ``tcp://`` ones. It verifies and decodes requests, refuses replays, answers heartbeats, expires clients
  whose lease ran out, and forwards replies; it never waits on a forward.
- Worker threads run engine calls (a ``generate`` blocks its worker until the run pauses or ends) and send
  their reply through a per-thread PUSH socket to the IO thread, since ZeroMQ sockets are single-threaded.

Edge rules: a frame larger than ``max_message`` is dropped by ZeroMQ before it is buffered; a request must be
signed with the daemon's key or a user's token (``auth.py``), carry a sequence number not seen before, name a
known op with known arguments, and may touch only sessions its client opened; a session of another client is
reported exactly like a missing one. Only the owner (the daemon's own key) may ask for ``OWNER_OPS``.
A client is known by the id in every request header, bound to the user who signed its first request, and kept
alive by heartbeats from its own thread; when none arrives for ``lease`` seconds (kernel restart, crash, lost
network), every session it owned is closed and its memory reclaimed. A failing request produces an error reply
to that request only.
"""

from __future__ import annotations

import concurrent.futures
import faulthandler
import inspect
import itertools
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import __version__
from .allocator import trim
from .auth import OWNER, ReplayGuard, TokenStore, require_curve
from .engine import Engine
from .errors import DjinnError, InvalidArgumentError, PermissionDeniedError, ProtocolError, SessionClosedError
from .protocol import (
    CLUSTER_OPS,
    OPS,
    OWNER_OPS,
    PROTOCOL_VERSION,
    MsgType,
    decode,
    encode,
    error_body,
    protocol_1_refusal,
    signer,
)

REPLIES = "inproc://djinn-replies"
MAX_MESSAGE = 1 << 30  # bytes per frame; ZeroMQ drops a larger one unread (`djinn serve --max-message-size`)

Peer = tuple[int, bytes]  # (which ROUTER, the peer's routing id on it)


@dataclass
class Client:
    label: str
    user: str = OWNER
    key: bytes = b""
    name: str = "?"
    pid: int | None = None
    sessions: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    expired: bool = False

    @property
    def owner(self) -> str:
        """The owner its sessions show: the user of a named token, else this client's label."""
        return self.user or self.label


@dataclass(frozen=True)
class Security:
    """What the daemon checks at its edge: its own key, the named tokens, the CURVE secret for ``tcp://``."""

    key: bytes
    tokens: TokenStore | None = None
    curve_secret: bytes | None = None
    max_message: int = MAX_MESSAGE

    def key_for(self, user: str) -> bytes:
        """The key ``user``'s messages must be signed with; an unknown user fails like a wrong signature."""
        if user == OWNER:
            return self.key
        key = self.tokens.key(user) if self.tokens is not None else None
        if key is None:
            raise ProtocolError("bad signature: this daemon has no such token (removed with `djinn token remove`?)")
        return key


class Daemon:
    def __init__(
        self, engine: Engine, security: Security, endpoints: list[str], workers: int = 64, lease: float = 5.0
    ) -> None:
        if any(e.startswith("tcp://") for e in endpoints):
            require_curve()
            if security.curve_secret is None:
                raise InvalidArgumentError("a tcp:// endpoint needs the daemon's CURVE secret (auth.server_keypair)")
        self.engine = engine
        self.security = security
        self.endpoints = endpoints
        self.lease = lease
        self.instance = secrets.token_hex(8)
        self._guard = ReplayGuard(self.instance)
        self._ctx = zmq.Context()
        self._routers: list[zmq.Socket] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="djinn-request")
        self._clients: dict[str, Client] = {}
        self._clients_lock = threading.Lock()
        self._labels = itertools.count(1)
        self._reclaimed = 0  # clients whose lease ran out and whose sessions' memory has been given back
        self._local = threading.local()
        self._stop = threading.Event()

    # IO thread ------------------------------------------------------------------------------------------
    def _router(self, endpoints: list[str], encrypted: bool) -> zmq.Socket:
        """A ROUTER bound to ``endpoints``; CURVE is a property of the whole socket, hence one per transport."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.security.max_message)
        if encrypted:
            router.curve_server = True
            router.curve_secretkey = self.security.curve_secret
            router.setsockopt(zmq.TCP_KEEPALIVE, 1)
            router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        for endpoint in endpoints:
            router.bind(endpoint)
        return router

    def _bind(self) -> list[zmq.Socket]:
        remote = [e for e in self.endpoints if e.startswith("tcp://")]
        local = [e for e in self.endpoints if e not in remote]
        return [self._router(group, encrypted) for group, encrypted in ((local, False), (remote, True)) if group]

    def serve_forever(self) -> None:
        self._routers = self._bind()
        replies = self._ctx.socket(zmq.PULL)
        replies.bind(REPLIES)
        poller = zmq.Poller()
        for router in (*self._routers, replies):
            poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(200))
                for index, router in enumerate(self._routers):
                    while router in ready and router.poll(0):
                        identity, *frames = router.recv_multipart()
                        self._on_request((index, identity), frames)
                while replies in ready and replies.poll(0):
                    self._forward(replies.recv_multipart())
                self._expire()
            while replies.poll(100):  # the last replies, the answer to `shutdown` among them
                self._forward(replies.recv_multipart())
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.engine.shutdown()
            for sock in (*self._routers, replies):
                sock.close(0)

    def _forward(self, message: list[bytes]) -> None:
        """Send a worker's reply (``[router index, identity, *frames]``) out through the router it came in on."""
        index, *frames = message
        self._routers[index[0]].send_multipart(frames, copy=False)

    def _send(self, peer: Peer, frames: list[bytes | memoryview]) -> None:
        self._routers[peer[0]].send_multipart([peer[1], *frames], copy=False)

    def stop(self) -> None:
        self._stop.set()

    def _expire(self) -> None:
        """Reclaim the sessions of clients whose heartbeats stopped (their process or network went away)."""
        now = time.monotonic()
        with self._clients_lock:
            dead = [cid for cid, c in self._clients.items() if now - c.last_seen > self.lease]
            gone = [self._clients.pop(cid) for cid in dead]
            for client in gone:
                client.expired = True
            orphans = [sorted(client.sessions) for client in gone]
        for client, sids in zip(gone, orphans):
            if sids:  # an operator reading the log sees why these sessions went
                print(f"djinn: client {client.label} ({client.name}, pid {client.pid}) sent no heartbeat for "
                      f"{now - client.last_seen:.1f} s (lease {self.lease:g} s): closing its sessions {sids}",
                      file=sys.stderr, flush=True)
            self._pool.submit(self._reclaim_all, sids)

    def _reclaim_all(self, sids: list[int]) -> None:
        """Close a dead client's sessions, then give the memory their runs freed back to the OS (``allocator``:
        without the trim the daemon's RSS grew by ~800 MiB over 45 clients killed mid-run). No caller waits for
        this, so a session that fails to close is reported in the daemon's log and the others are still closed."""
        for sid in sids:
            try:
                self._reclaim(sid)
            except Exception as exc:  # noqa: BLE001 - logged; one session's failure must not keep the rest
                print(f"djinn: reclaiming session {sid} of a dead client failed: {exc!r}", file=sys.stderr, flush=True)
        if sids:  # a client that held nothing freed nothing: no walk through the arenas for it
            trim()
        with self._clients_lock:
            self._reclaimed += 1

    def _reclaim(self, sid: int) -> None:
        try:
            self.engine.close_session(sid)
        except SessionClosedError:
            pass

    @staticmethod
    def _request(frames: list[bytes], key: bytes) -> dict[str, Any]:
        kind, header = decode(frames, key)
        if kind is not MsgType.REQUEST:
            raise ProtocolError(f"the daemon accepts requests, not {kind.name}")
        return header

    def _client(self, client_id: str, user: str, key: bytes) -> Client:
        """The client record for ``client_id``, made on its first request and bound to the user who signed it."""
        with self._clients_lock:
            client = self._clients.get(client_id)
            if client is None:
                client = self._clients[client_id] = Client(f"client-{next(self._labels)}", user, key)
            if client.user != user:
                raise ProtocolError("this client id belongs to another user; connect again")
            client.last_seen = time.monotonic()
        return client

    def _on_request(self, peer: Peer, frames: list[bytes]) -> None:
        refusal = protocol_1_refusal(frames, self.security.key)
        if refusal is not None:
            self._send(peer, refusal)
            return
        user, key, header = OWNER, self.security.key, {}
        try:
            user = signer(frames)
            key = self.security.key_for(user)
            header = self._request(frames, key)
            self._guard.check(user, header)
            client = self._client(header["client"], user, key)
        except DjinnError as exc:
            request_id = header.get("id") if isinstance(header.get("id"), int) else 0
            self._send(peer, encode(MsgType.ERROR, {"id": request_id, "error": error_body(exc)}, key, user))
            return
        if header.get("op") in ("heartbeat", "goodbye"):
            if header["op"] == "goodbye":
                client.last_seen = float("-inf")  # expired on this very loop iteration
            self._send(peer, encode(MsgType.REPLY, {"id": header.get("id"), "result": None}, key, user))
            return
        self._pool.submit(self._execute, peer, client, header)

    # worker threads -------------------------------------------------------------------------------------
    def _push(self) -> zmq.Socket:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(REPLIES)
            self._local.push = sock
        return sock

    def _execute(self, peer: Peer, client: Client, header: dict[str, Any]) -> None:
        request_id = header.get("id") if isinstance(header.get("id"), int) else 0
        stopping = False
        try:
            result = self._dispatch(client, header.get("op"), header.get("args", {}))
            frames = encode(MsgType.REPLY, {"id": request_id, "result": result}, client.key, client.user)
            stopping = header.get("op") == "shutdown"
        except BaseException as exc:  # noqa: BLE001 - every failure becomes this request's error reply
            frames = encode(MsgType.ERROR, {"id": request_id, "error": error_body(exc)}, client.key, client.user)
        self._push().send_multipart([bytes([peer[0]]), peer[1], *frames], copy=False)
        if stopping:
            self.stop()  # after the reply is queued, so the caller learns that the daemon is going

    def _dispatch(self, client: Client, op: object, args: object) -> Any:
        if not isinstance(op, str) or op not in OPS:
            raise InvalidArgumentError(f"unknown operation {op!r}")
        if not isinstance(args, dict) or set(args) - set(OPS[op]):
            raise InvalidArgumentError(f"{op} takes arguments {', '.join(OPS[op]) or 'none'}, got {args!r}")
        if op in OWNER_OPS and client.user != OWNER:
            raise PermissionDeniedError(
                f"only the daemon's owner may {op} it; you are signed in as {client.user!r}. Ask the user who "
                f"started it (`djinn stop` on that machine)"
            )
        method = getattr(self.engine, op, None)
        if method is not None:  # before the cases below read their arguments: a missing one is the caller's error
            try:
                inspect.signature(method).bind(**args)
            except TypeError as exc:
                raise InvalidArgumentError(f"{op}: {exc}") from None
        if "sid" in args:
            self._check_owner(client, args["sid"])
        if op == "hello":
            pid = args.get("pid")
            client.name, client.pid = str(args.get("name", "?")), pid if type(pid) is int else None
            return {**self.describe(), "lease": self.lease, "user": client.user}
        if op == "shutdown":
            return {"stopping": True}
        if op == "open_session":
            return self._adopt(client, self.engine.open_session(args.get("model_id"), owner=client.owner))
        if op == "fork":
            return self._adopt(client, self.engine.fork(args["sid"]))
        if op == "close_session":
            with self._clients_lock:
                client.sessions.discard(args["sid"])
            return self.engine.close_session(args["sid"])
        if op == "sessions":
            return [s for s in self.engine.sessions() if self._owns(client, s["id"])]
        if op == "status":
            return self._status(client)
        if method is None:
            if op in CLUSTER_OPS:
                raise InvalidArgumentError(
                    f"{op}: this daemon serves one engine; {CLUSTER_OPS[op]} needs a daemon started with djinn serve "
                    f"--ray"
                )
            raise InvalidArgumentError(f"this daemon's engine has no operation {op!r}")
        return method(**args)

    def _adopt(self, client: Client, sid: int) -> int:
        """Give a new session to ``client``; if its lease ran out meanwhile, reclaim the session at once, since
        ``_expire`` has already closed everything it knew the client owned."""
        with self._clients_lock:
            if not client.expired:
                client.sessions.add(sid)
                return sid
        self._reclaim(sid)
        raise SessionClosedError("this client's lease ran out while the session opened; connect again")

    def _owns(self, client: Client, sid: object) -> bool:
        with self._clients_lock:
            return sid in client.sessions

    def _check_owner(self, client: Client, sid: object) -> None:
        if isinstance(sid, bool) or not isinstance(sid, int) or not self._owns(client, sid):
            raise SessionClosedError(f"session {sid!r} does not exist or was closed; open a new one with model.session()")

    def _status(self, client: Client) -> dict[str, Any]:
        """The engine's status with other clients' sessions reduced to state and memory (no content)."""
        status = self.engine.status()
        sessions = []
        for s in status["sessions"]:
            mine = self._owns(client, s["id"])
            sessions.append(s if mine else {k: s[k] for k in ("id", "owner", "model", "state", "memory")})
            sessions[-1]["mine"] = mine
        with self._clients_lock:
            clients = [
                {"label": c.label, "user": c.user, "name": c.name, "sessions": len(c.sessions)}
                for c in self._clients.values()
            ]
            reclaimed = self._reclaimed
        return {
            **status, "sessions": sessions, "clients": clients, "reclaimed_clients": reclaimed,
            "daemon": self.describe(),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "instance": self.instance,
            "max_message": self.security.max_message,
            "endpoints": self.endpoints,
            "device": str(self.engine.device),
        }


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT stop the daemon; SIGUSR1 writes every thread's stack to its log (stderr), so a daemon
    that stopped answering can be asked where it is stuck (`kill -USR1 PID`) without stopping it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    faulthandler.register(signal.SIGUSR1, all_threads=True)
