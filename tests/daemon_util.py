"""Start and stop real daemon processes for tests, each in its own private runtime folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from djinn_kernel.client import DaemonClient, start_local_daemon
from djinn_kernel.protocol import MsgType, decode, sign
from djinn_kernel.runtime import DaemonInfo, pid_alive

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("DJINN_TEST_DEVICE", "cpu")
WAIT_MS = 30_000  # a bound on waiting for the daemon's answer, never a synchronisation by sleeping


class DaemonProcess:
    """A daemon process under test; ``client()`` returns a new client (a new client id, like a new kernel)."""

    def __init__(self, *args: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="djt-", dir="/tmp"))
        os.chmod(self.folder, 0o700)
        self.env = {**os.environ, "DJINN_RUNTIME_DIR": str(self.folder)}
        saved = os.environ.get("DJINN_RUNTIME_DIR")
        os.environ["DJINN_RUNTIME_DIR"] = str(self.folder)
        try:
            self.info: DaemonInfo = start_local_daemon(
                self.folder, ["--device", DEVICE, *([] if "--fast" in args else ["--deterministic"]),
                              "--client-lease", "1", *args]
            )
        finally:
            if saved is None:
                os.environ.pop("DJINN_RUNTIME_DIR")
            else:
                os.environ["DJINN_RUNTIME_DIR"] = saved
        self._clients: list[DaemonClient] = []

    def client(self, name: str = "test") -> DaemonClient:
        c = DaemonClient(self.info.ipc, self.info.key(), daemon_pid=self.info.pid, name=name)
        self._clients.append(c)
        return c

    def script(self, code: str) -> subprocess.Popen:
        """Run ``code`` in a separate Python process (a separate kernel) attached to this daemon."""
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env={**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        if pid_alive(self.info.pid):
            os.kill(self.info.pid, 15)
            wait_until(lambda: not pid_alive(self.info.pid), 30, "daemon exit")

    def log(self) -> str:
        return (self.folder / "daemon.log").read_text(errors="replace")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for another process to reach a state (bounded); tests of one process never need this."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class RawPeer:
    """A DEALER on a daemon's local socket that sends exactly the frames a test forges or replays."""

    def __init__(self, endpoint: str, key: bytes) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.key = key

    def ask(self, frames: list[bytes]) -> tuple[MsgType, dict]:
        self.sock.send_multipart(frames)
        assert self.sock.poll(WAIT_MS), "the daemon did not answer"
        return decode(self.sock.recv_multipart(), self.key)

    def close(self) -> None:
        self.sock.close(0)


def request(instance: str, seq: int, client: str = "c" * 32, op: str = "status") -> dict:
    """A request header that passes the replay check of the daemon ``instance`` (a new ``client`` each time)."""
    return {"op": op, "args": {}, "id": seq, "client": client, "seq": seq, "daemon": instance}


def forge(key: bytes, header: dict | bytes, *buffers: bytes, kind: bytes = b"\x01", user: bytes = b"") -> list[bytes]:
    """Frames signed exactly as ``protocol.encode`` does, around a header and buffers a test chose."""
    head = header if isinstance(header, bytes) else json.dumps({"v": 2, **header}).encode()
    return [kind, head, user + b":" + sign(key, [user, kind, head, *buffers]), *buffers]


def tensor(index: object = 0, dtype: object = "float32", shape: object = (2,)) -> dict:
    """The header entry of a tensor held in raw buffer ``index``."""
    return {"__tensor__": index, "dtype": dtype, "shape": list(shape)}
