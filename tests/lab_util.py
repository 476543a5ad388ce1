"""A Jupyter server (or JupyterLab) subprocess for tests, with the Djinn extensions of this checkout enabled.

Nothing is installed: the server extension is enabled through a private config folder, the built lab extension
is found through a private ``JUPYTER_PATH`` that links to ``djinn_lab/labextension``, and the server and its
kernels import this checkout first (``PYTHONPATH``). ``DJINN_RUNTIME_DIR`` points at the test's daemon folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon_util import wait_until

ROOT = Path(__file__).resolve().parent.parent
# Debian's Chromium, driven by Playwright (which cannot download its own browsers here), for the browser tests.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LABEXTENSION = ROOT / "djinn_lab" / "labextension"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """``python -m jupyterlab`` (``lab=True``) or ``jupyter_server`` on a free port with a random token."""

    def __init__(self, folder: Path, runtime_dir: Path, *, lab: bool = False) -> None:
        self.folder, self.token, port = folder, secrets.token_hex(16), _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config, data = folder / ".jupyter", folder / ".share"
        config.mkdir(exist_ok=True)
        (config / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": {"djinn_lab": True}}})
        )
        (data / "labextensions").mkdir(parents=True, exist_ok=True)
        (data / "labextensions" / "djinn-lab").symlink_to(LABEXTENSION)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_PATH": str(data),
            "JUPYTER_RUNTIME_DIR": str(folder / ".runtime"),
            "DJINN_RUNTIME_DIR": str(runtime_dir),
        }
        app = ["jupyterlab", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        self.log_path = folder / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *(app if lab else ["jupyter_server"]), "--no-browser", "--allow-root",
                 f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
                 f"--ServerApp.root_dir={folder}"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self._ready, 90, f"the Jupyter server to start (log: {self.log_path})")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the Jupyter server exited:\n{self.log()[-3000:]}")
        try:
            self.get("/api/status")
        except OSError:
            return False
        return True

    def get(self, path: str, *, token: str | None = "") -> Any:
        """GET ``path`` as JSON; ``token=None`` sends no credentials, ``""`` the server's token."""
        headers = {} if token is None else {"Authorization": f"token {token or self.token}"}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
            return json.loads(r.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
