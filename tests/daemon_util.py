"""Start and stop real daemon processes for tests, each in its own private runtime folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from djinn_kernel.client import DaemonClient, start_local_daemon
from djinn_kernel.runtime import DaemonInfo, pid_alive

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("DJINN_TEST_DEVICE", "cpu")


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
