"""A backend that forwards every engine call to a daemon, so the Python API works unchanged over ZeroMQ.

``connect()`` finds the user's local daemon through the private runtime folder, starting one if there is none;
``connect("tcp://host:port", token=..., server_key=...)`` attaches to a remote one over CurveZMQ. A client holds
no weights and no engine state: only its sockets, the key that signs its messages, and the id of the request it
is waiting for. Every request carries the next number of one counter (``seq``), so the daemon can refuse a replay.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .auth import OWNER, parse_token, require_curve
from .errors import DaemonConnectionError, DjinnError, MessageTooLargeError
from .protocol import OPS, MsgType, bind_args, decode, encode, raise_error
from .runtime import DaemonInfo, pid_alive, read_info, runtime_dir

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class DaemonClient:
    """The engine's methods (see ``protocol.OPS``), executed by a daemon.

    Each calling thread gets its own socket (ZeroMQ sockets are single-threaded), all under one client id, so
    a widget refreshing from a background thread is never stuck behind a cell's long ``generate``. A
    heartbeat thread keeps the client's lease alive; when this process dies the beats stop and the daemon
    reclaims the client's sessions. ``tcp://`` sockets are encrypted with CURVE and need the daemon's public
    ``server_key``; ``user`` names the token's owner ("" for the daemon's own key).
    """

    def __init__(
        self,
        endpoint: str,
        key: bytes,
        daemon_pid: int | None = None,
        name: str = "python",
        *,
        user: str = OWNER,
        server_key: str | bytes | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = uuid.uuid4().hex
        self.user = user
        self._key = key
        self._server_key = _curve_key(endpoint, server_key)
        self._daemon_pid = daemon_pid
        self._ctx = zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._sockets_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)  # one counter for every socket of this client (next() is atomic)
        self._closed = threading.Event()
        self._addressing: dict[str, Any] = {"client": self.client_id}
        self._max_message: int | None = None
        self.daemon = self.call("hello", name=name, pid=os.getpid(), timeout=30.0)
        self._addressing["daemon"] = self.daemon.get("instance")
        self._max_message = self.daemon.get("max_message")
        interval = max(0.1, float(self.daemon.get("lease", 5.0)) / 5)
        self._beats = threading.Thread(target=self._heartbeat, args=(interval,), name="djinn-heartbeat", daemon=True)
        self._beats.start()

    def _socket_for(self, endpoint: str, handshake: bool = False) -> zmq.Socket:
        """A connected DEALER; with ``handshake``, returned only once its CURVE handshake succeeded."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._server_key is None:
            sock.connect(endpoint)
            return sock
        sock.curve_serverkey = self._server_key
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        if handshake:
            self._connect_encrypted(sock, endpoint, 30.0)
        else:
            sock.connect(endpoint)
        return sock

    def _connect_encrypted(self, sock: zmq.Socket, endpoint: str, timeout: float) -> None:
        """Connect and wait for the handshake, so a wrong server key fails now instead of leaving every call
        waiting for an answer that cannot come (the monitor is attached first, or the event could be missed)."""
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED)
        try:
            sock.connect(endpoint)
            event = recv_monitor_message(monitor)["event"] if monitor.poll(timeout * 1000) else None
        finally:
            sock.disable_monitor()
            monitor.close(0)
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        sock.close(0)
        if event is None:
            raise DaemonConnectionError(f"no answer from the daemon at {endpoint}; is it listening there?")
        raise DaemonConnectionError(
            f"the encrypted handshake with {endpoint} failed: wrong server key? Use the one `djinn serve` printed "
            f"(server_key=...)"
        )

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._socket_for(self.endpoint, handshake=True)
            with self._sockets_lock:
                if self._closed.is_set():
                    sock.close(0)
                    raise DaemonConnectionError("this client is closed; connect again with djinn_kernel.connect()")
                self._sockets.append(sock)
            self._local.socket = sock
        return sock

    def _send(self, sock: zmq.Socket, header: dict[str, Any]) -> None:
        message = {**header, **self._addressing, "seq": next(self._seq)}
        frames = encode(MsgType.REQUEST, message, self._key, self.user)
        largest = max(len(f) for f in frames)
        if self._max_message is not None and largest > self._max_message:
            raise MessageTooLargeError(
                f"{header.get('op')}: a frame of {largest} bytes is over the daemon's maximum message size of "
                f"{self._max_message} bytes; send a smaller tensor or restart the daemon with a larger "
                f"`djinn serve --max-message-size`"
            )
        sock.send_multipart(frames, copy=False)

    def _heartbeat(self, interval: float) -> None:
        sock = self._socket_for(self.endpoint)
        try:
            beat = itertools.count(1)
            while not self._closed.wait(interval):
                self._send(sock, {"op": "heartbeat", "args": {}, "id": -next(beat)})
                while sock.poll(0):
                    sock.recv_multipart()
        finally:
            sock.close(0)

    def __getattr__(self, op: str) -> Any:
        if op in OPS:
            return functools.partial(self.call, op)
        raise AttributeError(op)

    def migrate(self, sid: int, engine: int | str | None = None) -> Any:
        """Move an idle session to another engine of a cluster daemon (`djinn serve --ray`); a daemon serving one
        engine refuses it. A method of its own (not through ``__getattr__``): ``Session.migrate`` looks for it on
        the backend's class, since only a cluster has it in process."""
        return self.call("migrate", sid, engine)

    def load_split(self, name: str, split_at: int, dtype: str = "auto") -> Any:
        """Load a model split by layer over two engines of a cluster daemon; a daemon serving one engine refuses
        it. A method of its own for the same reason as ``migrate``."""
        return self.call("load_split", name, split_at, dtype)

    def call(self, op: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Send one request and wait for its reply; a Djinn error in the daemon is raised here, same type."""
        header = {"op": op, "args": bind_args(op, args, kwargs)}
        sock = self._socket()
        if sock.closed:
            raise DaemonConnectionError("this client is closed; connect again with djinn_kernel.connect()")
        request_id = next(self._ids)
        self._send(sock, {**header, "id": request_id})
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not sock.poll(500):
                self._check_alive(op, deadline)
                continue
            kind, reply = decode(sock.recv_multipart(), self._key)
            if reply.get("id") not in (request_id, 0):
                continue  # the late answer to a request whose caller was interrupted
            if kind is MsgType.ERROR:
                raise_error(reply.get("error", {}))
            return reply.get("result")

    def _check_alive(self, op: str, deadline: float | None) -> None:
        if self._daemon_pid is not None and not pid_alive(self._daemon_pid):
            raise DaemonConnectionError(
                f"the daemon (pid {self._daemon_pid}) exited while {op} was running; its log is in {runtime_dir()}"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise DaemonConnectionError(f"no answer from the daemon at {self.endpoint} ({op}); is it running?")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop the heartbeats and disconnect; the daemon then closes every session this client opened."""
        if self._closed.is_set():
            return
        try:
            self.call("goodbye", timeout=5.0)
        except DjinnError:
            pass  # the daemon is gone already: nothing left to reclaim
        with self._sockets_lock:
            self._closed.set()
            for sock in self._sockets:
                sock.close(0)

    def __repr__(self) -> str:
        return f"<djinn DaemonClient {self.endpoint} pid={self.daemon.get('pid')}>"


def _curve_key(endpoint: str, server_key: str | bytes | None) -> bytes | None:
    """The daemon's public CURVE key for a ``tcp://`` endpoint (required there), None for ``ipc://``."""
    if not endpoint.startswith("tcp://"):
        return None
    require_curve()
    if not server_key:
        raise DaemonConnectionError(
            f"{endpoint} is encrypted: pass the daemon's server key, connect({endpoint!r}, token=..., "
            f"server_key=...) (`djinn serve` prints it)"
        )
    key = server_key.encode() if isinstance(server_key, str) else server_key
    if len(key) != 40:
        raise DaemonConnectionError(f"a server key is 40 characters (Z85) as `djinn serve` printed it, not {len(key)}")
    return key


def connect(
    endpoint: str | None = None,
    token: str | None = None,
    *,
    server_key: str | None = None,
    start: bool = True,
    name: str = "python",
) -> DaemonClient:
    """Attach to a daemon: the local one by default (started if needed), or ``tcp://host:port`` with a token and
    the daemon's server key (both printed by `djinn serve`; a token of your own from `djinn token add`)."""
    if endpoint is None:
        info = _local(start=start)
        return DaemonClient(info.ipc, info.key(), daemon_pid=info.pid, name=name)
    if endpoint.startswith("tcp://") and not token:
        raise DaemonConnectionError(
            f"{endpoint} needs a token: connect({endpoint!r}, token=..., server_key=...) (`djinn serve` prints both)"
        )
    user, key = parse_token(token) if token else (OWNER, _local().key())
    if server_key is None:
        server_key = _published_server_key(endpoint)
    return DaemonClient(endpoint, key, name=name, user=user, server_key=server_key)


def _published_server_key(endpoint: str) -> str | None:
    """The server key the local daemon published, when ``endpoint`` is one of its own (a local tcp client)."""
    try:
        info = read_info(runtime_dir())
    except DjinnError:
        return None
    return info.server_key if info is not None and endpoint in info.endpoints else None


def _local(start: bool = False) -> DaemonInfo:
    folder = runtime_dir()
    info = read_info(folder)
    if info is not None:
        return info
    if not start:
        raise DaemonConnectionError(f"no Djinn daemon is running for this user (looked in {folder}); start one with `djinn serve`")
    return start_local_daemon(folder)


def start_local_daemon(folder: Path, args: list[str] | None = None, timeout: float = 120.0) -> DaemonInfo:
    """Start ``djinn serve`` in the background (once, even if several kernels ask at the same moment)."""
    with open(folder / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = read_info(folder)
        if info is not None:
            return info
        log_path = folder / "daemon.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "djinn_kernel.cli", "serve", *(args or [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        # Reap it when it exits, so this process never keeps a zombie that looks alive to `djinn stop`.
        threading.Thread(target=proc.wait, name="djinn-daemon-reaper", daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = read_info(folder)
            if info is not None and info.pid == proc.pid:
                return info
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise DaemonConnectionError(f"the daemon exited at start (code {proc.returncode}):\n{tail}")
            time.sleep(0.05)  # waiting on another process's start-up, not on a thread of ours
        proc.kill()
        raise DaemonConnectionError(f"the daemon did not start within {timeout:.0f} s; see {log_path}")
