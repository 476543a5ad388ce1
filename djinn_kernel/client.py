"""A backend that forwards every engine call to a daemon, so the Python API works unchanged over ZeroMQ.

``connect()`` finds the user's local daemon through the private runtime folder, starting one if there is none;
``connect("tcp://host:port", token=...)`` attaches to a remote one. A client holds no weights and no engine
state: only a socket, the key that signs its messages, and the id of the request it is waiting for.
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

from .errors import DaemonConnectionError, DjinnError
from .protocol import OPS, MsgType, bind_args, decode, encode, raise_error
from .runtime import DaemonInfo, pid_alive, read_info, runtime_dir


class DaemonClient:
    """The engine's methods (see ``protocol.OPS``), executed by a daemon.

    Each calling thread gets its own socket (ZeroMQ sockets are single-threaded), all under one client id, so
    a widget refreshing from a background thread is never stuck behind a cell's long ``generate``. A
    heartbeat thread keeps the client's lease alive; when this process dies the beats stop and the daemon
    reclaims the client's sessions.
    """

    def __init__(self, endpoint: str, key: bytes, daemon_pid: int | None = None, name: str = "python") -> None:
        self.endpoint = endpoint
        self.client_id = uuid.uuid4().hex
        self._key = key
        self._daemon_pid = daemon_pid
        self._ctx = zmq.Context.instance()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._sockets_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self.daemon = self.call("hello", name=name, pid=os.getpid(), timeout=30.0)
        interval = max(0.1, float(self.daemon.get("lease", 5.0)) / 5)
        self._beats = threading.Thread(target=self._heartbeat, args=(interval,), name="djinn-heartbeat", daemon=True)
        self._beats.start()

    def _socket_for(self, endpoint: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            with self._sockets_lock:
                if self._closed.is_set():
                    raise DaemonConnectionError("this client is closed; connect again with djinn_kernel.connect()")
                sock = self._local.socket = self._socket_for(self.endpoint)
                self._sockets.append(sock)
        return sock

    def _heartbeat(self, interval: float) -> None:
        sock = self._socket_for(self.endpoint)
        try:
            beat = itertools.count(1)
            while not self._closed.wait(interval):
                header = {"op": "heartbeat", "args": {}, "id": -next(beat), "client": self.client_id}
                sock.send_multipart(encode(MsgType.REQUEST, header, self._key), copy=False)
                while sock.poll(0):
                    sock.recv_multipart()
        finally:
            sock.close(0)

    def __getattr__(self, op: str) -> Any:
        if op in OPS:
            return functools.partial(self.call, op)
        raise AttributeError(op)

    def call(self, op: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Send one request and wait for its reply; a Djinn error in the daemon is raised here, same type."""
        header = {"op": op, "args": bind_args(op, args, kwargs)}
        sock = self._socket()
        if sock.closed:
            raise DaemonConnectionError("this client is closed; connect again with djinn_kernel.connect()")
        request_id = next(self._ids)
        message = {**header, "id": request_id, "client": self.client_id}
        sock.send_multipart(encode(MsgType.REQUEST, message, self._key), copy=False)
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


def connect(
    endpoint: str | None = None, token: str | None = None, *, start: bool = True, name: str = "python"
) -> DaemonClient:
    """Attach to a daemon: the local one by default (started if needed), or ``tcp://host:port`` with its token."""
    if endpoint is not None:
        if endpoint.startswith("tcp://") and not token:
            raise DaemonConnectionError(
                f"{endpoint} needs the daemon's token: connect({endpoint!r}, token=...) (`djinn serve` prints it)"
            )
        key = token.encode() if token else _local().key()
        return DaemonClient(endpoint, key, name=name)
    info = _local(start=start)
    return DaemonClient(info.ipc, info.key(), daemon_pid=info.pid, name=name)


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
